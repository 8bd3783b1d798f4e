"""API keys: api_tokens.yml (TabbyAPI's `api_key`/`admin_key`, plus named `keys`), constant-time checks,
per-key rate limits, and safe edits of the file for `python proxy.py keys ...`.

Never logs keys or headers; logs and errors name keys by their name only.
"""

from __future__ import annotations

import fcntl
import functools
import hmac
import ipaddress
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import yaml
from werkzeug.datastructures import Headers as WerkzeugHeaders

from proxy.config import ConfigError
from proxy.errors import Forbidden, RateLimited, Unauthorized

log = logging.getLogger(__name__)

Headers = WerkzeugHeaders | Mapping[str, str]
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
RATE = re.compile(r"\s*([0-9]+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*")
P = ParamSpec("P")
R = TypeVar("R")
WINDOWS_S = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests: int
    per_s: float

    def __str__(self) -> str:
        unit = {1: "s", 60: "min", 3600: "h"}.get(int(self.per_s), f"{self.per_s:g}s")
        return f"{self.requests}/{unit}"


@dataclass(frozen=True, slots=True)
class KeyEntry:
    name: str
    key: str = field(repr=False)
    admin: bool = False
    rate_limit: RateLimit | None = None
    max_concurrent: int | None = None  # requests in progress at once; None: proxy.key_max_concurrent


@dataclass(frozen=True, slots=True)
class Keys:
    entries: tuple[KeyEntry, ...]
    disabled: bool = False

    def check(self, headers: Headers, *, admin: bool = False, keyless: KeyEntry | None = None) -> KeyEntry | None:
        """Return the caller's key entry (None with auth disabled).

        `keyless` is the entry a request that sends no key at all gets (LOOPBACK_KEY, for a loopback
        peer under proxy.loopback_without_key); a key that is sent must still match.
        Raises Unauthorized (no or unknown key) or Forbidden (a non-admin key on an admin route).
        The Host header plays no part.
        """
        if self.disabled:
            return None
        presented = presented_keys(headers)
        if not presented and keyless is None:
            raise Unauthorized("an API key is required: send Authorization: Bearer <key> or x-api-key: <key>")
        entry = self._match(presented) if presented else keyless
        if entry is None:
            raise Unauthorized("invalid API key")
        if admin and not entry.admin:
            raise Forbidden("this route needs an admin key (admin_key, or a key with admin: true)")
        return entry

    def _match(self, presented: list[str]) -> KeyEntry | None:
        found: KeyEntry | None = None
        for candidate in presented:
            for entry in self.entries:  # every comparison runs: timing says nothing about which matched
                if hmac.compare_digest(candidate.encode(), entry.key.encode()) and (found is None or entry.admin):
                    found = entry
        return found


# What a keyless request from loopback counts as: the plain api_key's rights and limits, under a name
# no configured key can have (KEY_NAME), so its admission and rate buckets are its own.
LOOPBACK_KEY = KeyEntry("(loopback)", "")


def keyless_entry(allowed: bool, peer: str | None) -> KeyEntry | None:
    """Return LOOPBACK_KEY when proxy.loopback_without_key is on and the peer is a loopback address."""
    return LOOPBACK_KEY if allowed and is_loopback(peer) else None


def is_loopback(address: str | None) -> bool:
    """Say whether a socket peer address (never a header's) is 127.0.0.0/8 or ::1, IPv4-mapped included."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def presented_keys(headers: Headers) -> list[str]:
    keys = [headers.get("x-admin-key", "") or "", headers.get("x-api-key", "") or ""]
    scheme, _, token = (headers.get("Authorization", "") or "").partition(" ")
    if scheme.lower() == "bearer":
        keys.append(token.strip())
    return [key for key in keys if key]


def load_keys(path: Path, *, disabled: bool = False, create_missing: bool = True) -> Keys:
    """Read api_tokens.yml; create it with random keys when missing (as TabbyAPI does).

    A reload passes create_missing=False: a key file that vanishes under a running proxy is an
    error (the running keys stay), never a reason to make new keys nobody knows.
    """
    if disabled:
        return Keys((), disabled=True)
    if not path.exists():
        if not create_missing:
            raise ConfigError(f"{path}: file not found")
        create_tokens_file(path)
    raw = _read(path)
    if not raw:
        raise ConfigError(f"{path}: the file is empty; it needs admin_key (and api_key or keys)")
    return keys_from(path, raw)


def keys_from(path: Path, raw: Mapping[str, Any]) -> Keys:
    """Validate the content of an api_tokens.yml (path is for messages)."""
    entries = [KeyEntry(name, key) for name, key in _legacy(path, "api_key", raw.get("api_key"))]
    entries += [KeyEntry(name, key, admin=True) for name, key in _legacy(path, "admin_key", raw.get("admin_key"))]
    named = raw.get("keys") or []
    if not isinstance(named, list):
        raise ConfigError(f"{path}: keys: expected a list of {{name, key, admin, rate_limit}}")
    for index, item in enumerate(named):
        entries.append(_named_key(path, index, item))
    names = [entry.name for entry in entries]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise ConfigError(f"{path}: keys: the name {duplicate!r} is used twice")
    if not any(entry.admin for entry in entries):
        raise ConfigError(f"{path}: admin_key: required (or a key with admin: true)")
    return Keys(tuple(entries))


def _legacy(path: Path, field_name: str, value: object) -> list[tuple[str, str]]:
    given = value if isinstance(value, list) else [] if value is None else [value]
    values = [item for item in given if isinstance(item, str) and len(item) >= 8]
    if len(values) != len(given):
        raise ConfigError(f"{path}: {field_name}: expected a key string of at least 8 characters")
    if len(values) == 1:
        return [(field_name, values[0])]
    return [(f"{field_name}[{index}]", item) for index, item in enumerate(values)]


def _named_key(path: Path, index: int, item: object) -> KeyEntry:
    where = f"{path}: keys[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected {{name, key, admin, rate_limit}}")
    unknown = set(item) - {"name", "key", "admin", "rate_limit", "max_concurrent"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    name, key, admin = item.get("name"), item.get("key"), item.get("admin", False)
    if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
        raise ConfigError(f"{where}.name: expected a name matching {KEY_NAME.pattern}, got {name!r}")
    if not isinstance(key, str) or len(key) < 8:
        raise ConfigError(f"{where}.key: expected a key string of at least 8 characters")
    if not isinstance(admin, bool):
        raise ConfigError(f"{where}.admin: expected true or false, got {admin!r}")
    max_concurrent = item.get("max_concurrent")
    if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
                                       or max_concurrent < 0):
        raise ConfigError(f"{where}.max_concurrent: expected a whole number >= 0 (0: no limit), got {max_concurrent!r}")
    return KeyEntry(name, key, admin, parse_rate_limit(item.get("rate_limit"), f"{where}.rate_limit"), max_concurrent)


def parse_rate_limit(value: object, where: str) -> RateLimit | None:
    """Return a rate limit from "60/min", "5/s", "1000/h" or a number of requests per minute."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return RateLimit(value, 60.0)
    match = RATE.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(f'{where}: expected requests per time like "60/min", "5/s" or "1000/h", got {value!r}')
    return RateLimit(int(match.group(1)), float(WINDOWS_S[match.group(2)]))


class RateLimiter:
    """Token buckets per key name: a key may burst up to its limit, refilled evenly over the window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)

    def check(self, entry: KeyEntry | None) -> None:
        """Take one request from the key's bucket; raise RateLimited (429, Retry-After) when empty."""
        if entry is None or entry.rate_limit is None:
            return
        limit = entry.rate_limit
        rate = limit.requests / limit.per_s
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(entry.name, (float(limit.requests), now))
            tokens = min(float(limit.requests), tokens + (now - at) * rate)
            if tokens < 1:
                self._buckets[entry.name] = (tokens, now)
                retry_after = max(1, math.ceil((1 - tokens) / rate))
                raise RateLimited(f"rate limit of key {entry.name!r} exceeded ({limit}); retry in {retry_after}s",
                                  retry_after_s=retry_after)
            self._buckets[entry.name] = (tokens - 1, now)


# ----- the file, for `python proxy.py keys ...` -------------------------------------------------------

def create_tokens_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"api_key": secrets.token_hex(16), "admin_key": secrets.token_hex(16)})
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as sink:
        sink.write(text)
    log.warning("created %s with new random API keys (api_key for clients, admin_key for /unload)", path)


def _one_edit_at_a_time(edit: Callable[Concatenate[Path, P], R]) -> Callable[Concatenate[Path, P], R]:
    """Run a read-modify-write of the key file under an exclusive lock, so concurrent `keys` runs queue
    instead of losing each other's keys (each rewrites the whole file)."""
    @functools.wraps(edit)
    def locked(path: Path, /, *args: P.args, **kwargs: P.kwargs) -> R:
        lock_path = path.with_name(f".{path.name}.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # released when the descriptor closes
            return edit(path, *args, **kwargs)
        finally:
            os.close(descriptor)
    return locked


@_one_edit_at_a_time
def add_key(path: Path, name: str, *, admin: bool = False, rate_limit: str | None = None,
            max_concurrent: int | None = None) -> str:
    """Add a named key to the file and return it (the only time it is shown)."""
    if not KEY_NAME.fullmatch(name):
        raise ConfigError(f"key name {name!r}: expected letters, digits, '.', '_', '@' or '-'")
    parse_rate_limit(rate_limit, "--rate-limit")
    if max_concurrent is not None and max_concurrent < 0:
        raise ConfigError(f"--max-concurrent: expected a whole number >= 0 (0: no limit), got {max_concurrent}")
    raw = _read(path) if path.exists() else {}
    if name in {entry.name for entry in keys_from(path, raw).entries} if raw else False:
        raise ConfigError(f"{path}: a key named {name!r} exists; use rotate to replace it")
    key = secrets.token_hex(24)
    item: dict[str, Any] = {"name": name, "key": key}
    if admin:
        item["admin"] = True
    if rate_limit:
        item["rate_limit"] = rate_limit
    if max_concurrent is not None:
        item["max_concurrent"] = max_concurrent
    raw["keys"] = [*(raw.get("keys") or []), item]
    if "admin_key" not in raw and not admin and not any(k.get("admin") for k in raw["keys"]):
        raw["admin_key"] = secrets.token_hex(16)
    _write(path, raw)
    return key


@_one_edit_at_a_time
def remove_key(path: Path, name: str) -> None:
    raw = _read(path)
    named = raw.get("keys") or []
    remaining = [item for item in named if item.get("name") != name]
    if len(remaining) == len(named):
        raise ConfigError(f"{path}: no named key {name!r} (see: python proxy.py keys list)")
    raw["keys"] = remaining
    keys_from(path, raw)  # refuse an edit that leaves no admin key
    _write(path, raw)


@_one_edit_at_a_time
def rotate_key(path: Path, name: str) -> str:
    """Give a key (named, or admin_key/api_key) a new random value; return it."""
    raw = _read(path)
    key = secrets.token_hex(24)
    if name in ("admin_key", "api_key") and isinstance(raw.get(name), str):
        raw[name] = key
    else:
        item = next((item for item in raw.get("keys") or [] if item.get("name") == name), None)
        if item is None:
            raise ConfigError(f"{path}: no key named {name!r} (see: python proxy.py keys list)")
        item["key"] = key
    _write(path, raw)
    return key


def list_keys(path: Path) -> list[KeyEntry]:
    return list(load_keys(path).entries)


def _read(path: Path) -> dict[str, Any]:
    """Return the key file's mapping. Errors give a line and column, never the file's text: it holds keys."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read API keys: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start}); save it as UTF-8") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        # PyYAML's message quotes the offending line, which may be a key: say only where it is.
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where} (the text is not shown: it holds keys)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected api_key, admin_key and keys")
    return raw


def _write(path: Path, raw: dict[str, Any]) -> None:
    """Replace the file atomically (a temporary file, fsync, rename), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as sink:
            yaml.safe_dump(raw, sink, sort_keys=False)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
