"""API keys: loading api_tokens.yml (TabbyAPI's format), constant-time checks, the request gate.

Never logs keys or headers.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from werkzeug.datastructures import Headers as WerkzeugHeaders

from proxy.config import ConfigError
from proxy.errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)


Headers = WerkzeugHeaders | Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Keys:
    api_keys: tuple[str, ...]
    admin_keys: tuple[str, ...]
    disabled: bool = False

    def check(self, headers: Headers, *, admin: bool = False) -> None:
        """Raise Unauthorized (no or unknown key) or Forbidden (an API key on an admin route)."""
        if self.disabled:
            return
        presented = presented_keys(headers)
        if not presented:
            raise Unauthorized("an API key is required: send Authorization: Bearer <key> or x-api-key: <key>")
        if any(_matches(key, self.admin_keys) for key in presented):
            return
        if not any(_matches(key, self.api_keys) for key in presented):
            raise Unauthorized("invalid API key")
        if admin:
            raise Forbidden("this route needs the admin key (admin_key in api_tokens.yml)")


def presented_keys(headers: Headers) -> list[str]:
    keys = [headers.get("x-admin-key", "") or "", headers.get("x-api-key", "") or ""]
    scheme, _, token = (headers.get("Authorization", "") or "").partition(" ")
    if scheme.lower() == "bearer":
        keys.append(token.strip())
    return [key for key in keys if key]


def _matches(candidate: str, keys: Iterable[str]) -> bool:
    matched = False
    for key in keys:  # compare against every key so timing says nothing about which one matched
        matched |= hmac.compare_digest(candidate.encode(), key.encode())
    return matched


def load_keys(path: Path, *, disabled: bool = False) -> Keys:
    """Read api_tokens.yml; create it with random keys when missing (as TabbyAPI does)."""
    if disabled:
        return Keys((), (), disabled=True)
    if not path.exists():
        create_tokens_file(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read API keys: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected api_key and admin_key")
    api = _key_list(path, "api_key", raw.get("api_key"))
    admin = _key_list(path, "admin_key", raw.get("admin_key"))
    if not admin:
        raise ConfigError(f"{path}: admin_key: required")
    return Keys(api, admin)


def _key_list(path: Path, field: str, value: object) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    for item in values:
        if not isinstance(item, str) or len(item) < 8:
            raise ConfigError(f"{path}: {field}: expected a key string of at least 8 characters")
    return tuple(values)


def create_tokens_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"api_key": secrets.token_hex(16), "admin_key": secrets.token_hex(16)})
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as sink:
        sink.write(text)
    log.warning("created %s with new random API keys (api_key for clients, admin_key for /unload)", path)
