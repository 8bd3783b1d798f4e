"""Servers on other machines as the config names them: a root URL (a trailing /v1 tolerated) and its
credentials (`api_key`, `api_key_env`, or a user and password in the URL) turned into a header, so
that the URL that logs, errors and /status show never carries a secret.
"""

from __future__ import annotations

import base64
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from proxy.config_node import ConfigNode


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A server's root URL, without credentials, and the headers that authenticate to it."""

    url: str  # scheme, host, port and path prefix; no user, no password, no trailing "/" or "/v1"
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)  # secrets

    def __str__(self) -> str:
        return self.url


def read_endpoint(node: ConfigNode) -> Endpoint:
    """Read `url` with `api_key` or `api_key_env` from a section; raise ConfigError naming the key.

    `api_key_env` is read now, from the proxy's environment (at start and at every reload).
    """
    raw = node.get("url", str, None)
    if not raw or not raw.strip():
        raise node.fail("url", "required: the server's root URL, like http://gpu-box:8080")
    parts = urllib.parse.urlsplit(raw.strip())
    shown = without_credentials(raw.strip())
    try:
        parts.port  # noqa: B018  # raises ValueError for a port that is not a number 0-65535
    except ValueError:
        raise node.fail("url", f"expected a port 1-65535 in the URL, got {shown!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise node.fail("url", f"expected an http:// or https:// URL with a host, got {shown!r}")
    if parts.query or parts.fragment:
        raise node.fail("url", f"expected the server's root URL without ?query or #fragment, got {shown!r}")
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v1") if path.endswith("/v1") else path  # the OpenAI routes add /v1 themselves
    url = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], path, "", ""))
    key = node.value.get("api_key")
    if key is not None and not isinstance(key, str):  # the value is never shown: it is a secret
        raise node.fail("api_key", f"expected a string (quote it in YAML), got {type(key).__name__}")
    variable = node.get("api_key_env", str, None)
    if key is not None and variable is not None:
        raise node.fail("api_key_env", "set api_key or api_key_env, not both")
    if variable is not None:
        key = os.environ.get(variable)
        if not key:
            raise node.fail("api_key_env", f"the environment variable {variable} is not set or empty")
    headers: dict[str, str] = {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if parts.username is not None:
        if key:
            raise node.fail("url", f"the URL carries a user and password and a key is set too; use one ({shown})")
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    return Endpoint(url, MappingProxyType(headers))


def without_credentials(url: str) -> str:
    """Return a URL with any user and password replaced by `***`, for messages."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return f"{scheme}://{netloc}{slash}{path}"
