"""Reading config files: `ConfigError`, the YAML reader, and `ConfigNode`, a mapping that knows its
file and key path, so every error names the file, the key path and the bad value. What the keys
mean is left to `settings.py` (the `proxy:` section) and `profiles.py` (model profiles).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from proxy.durations import parse_keep_alive
from proxy.errors import BadRequest


class ConfigError(Exception):
    """A configuration file is invalid; the message names the file, the key and the problem."""


class ConfigNode:
    """A mapping read from a file, remembering its key path for error messages."""

    def __init__(self, value: object, file: Path, where: str) -> None:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{file}: {where}: expected a mapping, got {type(value).__name__}")
        self.value = value
        self.file = file
        self.where = where

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.where}.{key}: {problem}" if self.where else f"{self.file}: {key}: {problem}")

    def reject_unknown(self, known: frozenset[str] | set[str]) -> None:
        for key in self.value:
            if key not in known:
                raise self.fail(str(key), f"unknown key (known keys: {', '.join(sorted(known))})")

    def child(self, key: str) -> ConfigNode:
        return ConfigNode(self.value.get(key) or {}, self.file, f"{self.where}.{key}" if self.where else key)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.value.get(key)
        if value is None:
            return default
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(key, f"expected {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise self.fail(key, f"expected {_kind_name(kind)}, got {value!r}")
        return value

    def positive(self, key: str, default: float, *, integer: bool = False) -> Any:
        value = self.get(key, int if integer else (int, float), default)
        if value <= 0:
            raise self.fail(key, f"expected a positive number, got {value!r}")
        return value

    def duration(self, key: str, default: float | None) -> float | None:
        if self.value.get(key) is None:
            return default
        try:
            return parse_keep_alive(self.value[key], field=key)
        except BadRequest:
            raise self.fail(key, f'expected seconds or a duration like "5m" (negative: never), got {self.value[key]!r}') from None

    def path(self, key: str, base: Path, default: Path | None) -> Path | None:
        value = self.get(key, str)
        if value is None:
            return None if default is None else (base / default).resolve()
        return (base / Path(value).expanduser()).resolve()


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "a mapping"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if set(kinds) == {int, float}:
        return "a number"
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def read_yaml(path: Path, *, missing_ok: bool) -> dict[str, Any]:
    """Return a YAML file's top-level mapping ({} for an empty file); raise ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start}); save it as UTF-8") from None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(value).__name__}")
    return value
