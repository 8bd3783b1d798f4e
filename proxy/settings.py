"""The `proxy:` section of config.yml, declared once: each `ProxySettings` field is a `setting()`
naming its key, reader, default, whether a reload applies it, and its README line. Reading the
section, its unknown-key errors, the reloader's restart-only list and the README test all use it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

from proxy.config_node import ConfigNode
from proxy.endpoints import Endpoint, read_endpoint
from proxy.memory import parse_size
from proxy.profiles import ProfileKey

DEFAULT_OLLAMA_VERSION = "0.13.5"  # what /api/version reports; clients enable features by it (Codex: >= 0.13.4)

T = TypeVar("T")


@dataclass(slots=True)
class Reading:
    """What a key's reader sees: the section, config.yml's folder, and the fields read before it."""

    node: ConfigNode
    base: Path  # relative paths resolve against it
    values: dict[str, Any]  # by field name, in declaration order: later keys may depend on earlier ones


Reader = Callable[[Reading, str, Any], Any]  # (reading, key, the field's default) -> the field's value


# ----- readers: check one value, raise ConfigError naming the key and the value ------------------

def _text(reading: Reading, key: str, default: Any) -> Any:
    return reading.node.get(key, str, default)


def _flag(reading: Reading, key: str, default: Any) -> Any:
    return reading.node.get(key, bool, default)


def _positive_int(reading: Reading, key: str, default: Any) -> Any:
    return reading.node.positive(key, default, integer=True)


def _positive(reading: Reading, key: str, default: Any) -> float:
    return float(reading.node.positive(key, default))


def _count(reading: Reading, key: str, default: Any) -> int:
    value: int = reading.node.get(key, int, default)
    if value < 0:
        raise reading.node.fail(key, f"expected a whole number >= 0 (0: no limit), got {value!r}")
    return value


def _non_negative(reading: Reading, key: str, default: Any) -> Any:
    value = reading.node.get(key, (int, float), default)
    if value < 0:
        raise reading.node.fail(key, f"expected a number >= 0, got {value!r}")
    return value


def _non_negative_float(reading: Reading, key: str, default: Any) -> float:
    return float(_non_negative(reading, key, default))


def _duration(reading: Reading, key: str, default: Any) -> float | None:
    return reading.node.duration(key, default)


def _path(reading: Reading, key: str, default: Any) -> Path | None:
    return reading.node.path(key, reading.base, default)


def _program(reading: Reading, key: str, default: Any) -> str | None:
    """Resolve a relative program path (one with a slash) against the config's folder."""
    value: str | None = reading.node.get(key, str, default)
    if value is None or "/" not in value:
        return value
    return str((reading.base / Path(value).expanduser()).resolve())


def _choice(*choices: str) -> Reader:
    def read(reading: Reading, key: str, default: Any) -> str:
        value: str = reading.node.get(key, str, default)
        if value not in choices:
            raise reading.node.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value
    return read


def _tcp_port(reading: Reading, key: str, default: Any) -> int:
    port: int = reading.node.get(key, int, default)
    if not 0 < port < 65536:
        raise reading.node.fail(key, f"expected a TCP port 1-65535, got {port}")
    return port


def _port_range(reading: Reading, key: str, default: Any) -> tuple[int, int]:
    value = reading.node.get(key, (list, str), None)
    if value is None:
        declared: tuple[int, int] = default
        return declared
    parts = value.split("-") if isinstance(value, str) else value
    try:
        low, high = (int(part) for part in parts)
    except (TypeError, ValueError):
        raise reading.node.fail(key, f'expected a range like "5001-5999" or [5001, 5999], got {value!r}') from None
    if not 0 < low <= high < 65536:
        raise reading.node.fail(key, f"expected 1 <= low <= high <= 65535, got {low}-{high}")
    return low, high


def _origins(reading: Reading, key: str, default: Any) -> tuple[str, ...]:
    origins = reading.node.get(key, (list, str), default)
    origins = [origins] if isinstance(origins, str) else origins
    for origin in origins:
        if not isinstance(origin, str) or not (origin == "*" or re.fullmatch(r"https?://[^/\s]+", origin)):
            raise reading.node.fail(key, f'expected origins like "https://chat.example.org", got {origin!r}')
    return tuple(origins)


def _semver(reading: Reading, key: str, default: Any) -> str:
    version: str = reading.node.get(key, str, default)
    if not re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", version):
        raise reading.node.fail(key, f'expected a plain version like "0.13.5" (clients parse it), got {version!r}')
    return version


def _size(reading: Reading, key: str, default: Any) -> int | None:
    value = reading.node.value.get(key)
    if value is None:
        declared: int | None = default
        return declared
    try:
        return parse_size(value)
    except ValueError as exc:
        raise reading.node.fail(key, str(exc)) from None


def _gpus(reading: Reading, key: str, default: Any) -> Mapping[int, int | None] | str | None:
    """Read `gpus`: `auto` (every GPU NVML sees), or per device index a size or `auto` (None here)."""
    value = reading.node.value.get(key)
    if value is None or value == "auto":
        chosen: Mapping[int, int | None] | str | None = value
        return chosen
    items = enumerate(value) if isinstance(value, list) else value.items() if isinstance(value, dict) else None
    if not items:
        raise reading.node.fail(key, f'expected auto, or sizes per GPU index like {{0: "23.5GiB", 1: auto}}, '
                                     f"got {value!r}")
    budgets: dict[int, int | None] = {}
    for index, size in items:
        if isinstance(index, bool) or not (isinstance(index, int) or str(index).isdigit()):
            raise reading.node.fail(key, f"expected GPU indices (0, 1, ...) as keys, got {index!r}")
        try:
            budgets[int(index)] = None if size == "auto" else parse_size(size)
        except ValueError as exc:
            raise reading.node.fail(f"{key}.{index}", f"{exc} or auto") from None
    return MappingProxyType(budgets)


def _names(reading: Reading, key: str, default: Any) -> tuple[str, ...]:
    names = reading.node.get(key, (list, str), default)
    names = [names] if isinstance(names, str) else names
    if not all(isinstance(name, str) and name for name in names):
        raise reading.node.fail(key, f"expected a list of model names, got {names!r}")
    return tuple(names)


def _request_log(reading: Reading, key: str, default: Any) -> str:
    if reading.node.value.get(key) is False:  # YAML reads a bare `off` as false
        return "off"
    value: str = reading.node.get(key, str, default)
    if value in ("sqlite", "off") or value.startswith(("postgresql://", "postgres://")):
        return value
    if "://" in value:
        raise reading.node.fail(key, f"expected sqlite, off, a file path or a postgresql:// URL, got a {value.split('://')[0]}:// URL")
    return str((reading.base / Path(value).expanduser()).resolve())  # an SQLite file


@dataclass(frozen=True, slots=True)
class PeerSettings:
    """Another instance of this proxy (one entry of `proxy.peers`) whose models this one lists and routes to."""

    name: str
    endpoint: Endpoint
    prefer: tuple[str, ...] = ()  # names this peer serves that win over a local profile or an earlier peer
    refresh_s: float = 10.0       # how often its /v1/models is read
    timeout_s: float = 5.0        # for each reading, and each check of it before a request


PEER_KEYS = (
    ProfileKey("name", "required", "what logs, `/status` and the model listings call the peer"),
    ProfileKey("url", "required", "the peer proxy's root URL (`http://gpu-box:9000`); a user and password in it "
                                  "are sent as Basic auth and never shown"),
    ProfileKey("api_key", "none", "a key of the peer (an admin key there, for `/unload` and loads to reach it); "
                                  "never logged"),
    ProfileKey("api_key_env", "none", "the name of an environment variable that holds the key, instead of "
                                      "`api_key`"),
    ProfileKey("prefer", "none", "model names (or aliases) this peer serves that win over a local profile and "
                                 "over earlier peers with the same name"),
    ProfileKey("refresh", "`10`", "seconds between two readings of the peer's `/v1/models`"),
    ProfileKey("timeout", "`5`", "seconds a reading of its `/v1/models` may take, and the check of it before a "
                                 "request for one of its models that is not ready here"),
)
PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _peers(reading: Reading, key: str, default: Any) -> tuple[PeerSettings, ...]:
    listed = reading.node.value.get(key)
    if listed is None:
        declared: tuple[PeerSettings, ...] = default
        return declared
    if not isinstance(listed, list):
        raise reading.node.fail(key, f"expected a list of peers like [{{name: gpu-box, url: http://gpu-box:9000, "
                                     f"api_key: ...}}], got {type(listed).__name__}")
    peers: list[PeerSettings] = []
    where = f"{reading.node.where}.{key}" if reading.node.where else key
    for index, item in enumerate(listed):
        node = ConfigNode(item, reading.node.file, f"{where}[{index}]")
        node.reject_unknown(frozenset(peer_key.key for peer_key in PEER_KEYS))
        name = node.get("name", str, None)
        if name is None or not PEER_NAME.fullmatch(name):
            raise node.fail("name", f"required: a name matching {PEER_NAME.pattern}, got {name!r}")
        if any(peer.name == name for peer in peers):
            raise node.fail("name", f"a peer named {name!r} is listed twice")
        prefer = node.get("prefer", (list, str), [])
        prefer = [prefer] if isinstance(prefer, str) else prefer
        if not all(isinstance(model, str) and model for model in prefer):
            raise node.fail("prefer", f"expected a list of model names, got {prefer!r}")
        peers.append(PeerSettings(name, read_endpoint(node), tuple(prefer), float(node.positive("refresh", 10.0)),
                                  float(node.positive("timeout", 5.0))))
    return tuple(peers)


# Every request in progress holds a thread, a waiting one included: the reserve keeps some for
# /health and admin routes, and a queue longer than the request slots could never fill.

def _threads(reading: Reading, key: str, default: Any) -> int:
    threads: int = reading.node.positive(key, default, integer=True)
    if threads < 2:
        raise reading.node.fail(key, f"expected at least 2 (one is kept for /health and admin routes), got {threads}")
    return threads


def _reserved_threads(reading: Reading, key: str, default: Any) -> int:
    threads = reading.values["threads"]
    reserved: int = reading.node.positive(key, max(1, min(default, threads // 4)), integer=True)
    if reserved >= threads:
        raise reading.node.fail(key, f"expected fewer than threads ({threads}), got {reserved}")
    return reserved


def _max_queue(reading: Reading, key: str, default: Any) -> int:
    slots = reading.values["threads"] - reading.values["reserved_threads"]
    max_queue: int = reading.node.positive(key, max(1, slots // 2), integer=True)
    if max_queue > slots:
        raise reading.node.fail(key, f"{max_queue} can never be reached: each waiting request holds one of the "
                                     f"{slots} request slots (threads - reserved_threads); set at most {slots}")
    return max_queue


# ----- the declarations ----------------------------------------------------------------------------

class _Declaration(NamedTuple):
    key: str
    read: Reader
    reload: bool
    doc: str
    shown: str | None


_DECLARATION = "proxy.settings"  # the field metadata key that holds a _Declaration


def setting(key: str, default: T, read: Reader, *, doc: str, reload: bool = True, shown: str | None = None) -> T:
    """Declare a ProxySettings field as the `proxy:` key `key`, read by `read` (in field order).

    reload=False: only a restart applies it (a reload warns and keeps the running value). `doc` is
    the README's Meaning column; `shown` its Default column where the plain default says too little.
    """
    return field(default=default, metadata={_DECLARATION: _Declaration(key, read, reload, doc, shown)})


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The `proxy:` section, validated; the field order is the README table's and the reading order."""

    host: str = setting("host", "127.0.0.1", _text, reload=False,
                        doc="address to listen on; set `0.0.0.0` to expose the proxy, and keep auth on")
    port: int = setting("port", 9000, _tcp_port, reload=False, doc="port to listen on")
    threads: int = setting("threads", 64, _threads, reload=False,
                           doc="waitress worker threads; each open stream or waiting request holds one (at least 2)")
    reserved_threads: int = setting(
        "reserved_threads", 8, _reserved_threads, reload=False, shown="`8` (a quarter of `threads` if that is less)",
        doc="threads kept for `/health`, `/ping`, admin routes and refusals; the others are the request slots: "
            "requests in progress at once, all keys together, waiting ones included (`threads - reserved_threads`, "
            "56 by default). Beyond them a request gets 503 `server_busy` with `Retry-After` at once")
    key_max_concurrent: int = setting(
        "key_max_concurrent", 16, _count,
        doc="requests in progress at once per key, for keys without their own `max_concurrent` (so always for the "
            "plain `api_key` and `admin_key`); beyond it 429 `rate_limited` with `Retry-After` at once; `0`: no "
            "limit per key")
    client_timeout_s: float = setting(
        "client_timeout", 60.0, _positive, reload=False,
        doc="seconds a client may accept no byte of an answer that is waiting for it; then its connection is "
            "closed, the stream cut, the backend request closed and the lease released (logged with the reason)")
    connection_limit: int = setting(
        "connection_limit", 1000, _positive_int, reload=False,
        doc="open client connections; more wait in the OS's listen backlog until one closes. The proxy raises its "
            "open-files limit (`ulimit -n`) toward twice this when it can")
    channel_timeout_s: float = setting("channel_timeout", 30.0, _positive, reload=False,
                                       doc="seconds an idle keep-alive connection stays open")
    header_timeout_s: float = setting(
        "header_timeout", 10.0, _positive, reload=False,
        doc="seconds from a request's first byte until its headers are complete; a slower one is closed")
    body_timeout_s: float = setting(
        "body_timeout", 60.0, _positive, reload=False,
        doc="seconds from the end of a request's headers until its whole body has arrived; a slower one is closed")
    unload_timer_s: float = setting("unload_timer", 300.0, _duration, shown="`5m` (300 s)",
                                    doc="default idle time before unloading a model; negative means never")
    max_loaded_models: int = setting("max_loaded_models", 1, _positive_int,
                                     doc="models resident at once (with budgets, an extra limit beside memory)")
    gpus: Mapping[int, int | None] | str | None = setting(
        "gpus", None, _gpus, shown="none (memory is not counted)",
        doc='the GPU memory models may take, per device index: `{0: "23.5GiB", 1: auto}`, or `auto` for every GPU; '
            "`auto` is the total NVML reports less `gpu_reserve`. With it, a model starts only when its footprint "
            "fits (see Memory)")
    gpu_reserve: int = setting("gpu_reserve", 512 * 1024 ** 2, _size, shown="`512MiB`",
                               doc="memory kept free on each `auto` GPU (the desktop, CUDA contexts of others)")
    ram_budget: int | None = setting("ram_budget", None, _size, shown="none (not counted)",
                                     doc="the memory models with a `ram` footprint may take together (`16GiB`)")
    preload: tuple[str, ...] = setting(
        "preload", (), _names, shown="none",
        doc="models started at start-up, in order, while they fit without evicting anything, and started again "
            "after a crash")
    startup_timeout_s: float = setting("startup_timeout", 600.0, _positive,
                                       doc="seconds a backend may take to become ready")
    stop_grace_s: float = setting("stop_grace", 10.0, _positive,
                                  doc="seconds between SIGTERM and SIGKILL (a forced `/unload` waits at most 1 s)")
    queue_timeout_s: float = setting("queue_timeout", 600.0, _positive,
                                     doc="seconds a request, or `/unload`, may wait before a 503")
    connect_timeout_s: float = setting("connect_timeout", 5.0, _positive, reload=False,
                                       doc="seconds to connect to a backend")
    read_timeout_s: float = setting("read_timeout", 600.0, _positive, reload=False,
                                    doc="seconds without a byte from a backend before giving up")
    backend_ports: tuple[int, int] = setting("backend_ports", (5001, 5999), _port_range, reload=False,
                                             shown="`5001-5999`",
                                             doc='loopback ports for backends: `"low-high"` or `[low, high]`')
    profiles_dir: Path = setting("profiles_dir", Path("model_configs"), _path,
                                 doc="folder of profiles; an error if set explicitly and missing")
    api_tokens_path: Path = setting("api_tokens", Path("api_tokens.yml"), _path,
                                    doc="key file in TabbyAPI's format; created with random keys when missing")
    state_dir: Path = setting("state_dir", Path("run"), _path, reload=False,
                              doc="backend logs, generated TabbyAPI configs, the PID file")
    disable_auth: bool = setting("disable_auth", False, _flag,
                                 doc="`true` turns off key checks and skips reading `api_tokens.yml`")
    loopback_without_key: bool = setting(
        "loopback_without_key", False, _flag, reload=False,
        doc="`true` lets a request that sends no key in from loopback (127.0.0.0/8, `::1`) as the plain `api_key`, "
            "named `(loopback)`, for clients that cannot send one (Codex CLI `--oss`); a wrong key still gets 401 "
            "and admin routes still need an admin key. It opens the API to every local process (see Security)")
    tabby_dir: Path | None = setting("tabby_dir", None, _path, doc="a TabbyAPI checkout, needed by `tabbyapi` profiles")
    max_body_mb: float = setting(
        "max_body_mb", 64.0, _positive, reload=False,
        doc="larger request bodies get 413; all bodies in progress together may take twice this (503 "
            "`server_busy` with `Retry-After` beyond it)")
    max_answer_mb: float = setting(
        "max_answer_mb", 256.0, _positive,
        doc="the most of one backend answer the proxy holds to translate it (Ollama's non-stream answers and "
            "embeddings); beyond it 502. OpenAI-route answers over 1 MiB pass through as they arrive and are never "
            "held whole")
    max_concurrent: int = setting(
        "max_concurrent", 0, _non_negative,
        doc="requests per model at once (`0`: no limit); more wait in the queue, first come first served")
    max_queue: int = setting(
        "max_queue", 28, _max_queue, shown="half the request slots (`28`)",
        doc="requests waiting for a model, all models together; beyond it 503 `model_busy` with `Retry-After` at "
            "once. Each waiting request holds a request slot, so it can be at most `threads - reserved_threads`")
    drain_timeout_s: float = setting(
        "drain_timeout", 30.0, _non_negative_float,
        doc="on SIGTERM, seconds running answers may take to finish before their backends are stopped")
    cors_origins: tuple[str, ...] = setting(
        "cors_origins", (), _origins, reload=False,
        doc='browser origins allowed to call the API (`["https://chat.example.org"]`); CORS is off without it')
    log_bodies: bool = setting("log_bodies", False, _flag, reload=False,
                               doc="log request bodies at DEBUG (they hold prompts)")
    ollama_version: str = setting(
        "ollama_version", DEFAULT_OLLAMA_VERSION, _semver,
        doc="the version `/api/version` reports (plain `MAJOR.MINOR.PATCH`; clients enable features by it)")
    tabby_auth: str = setting(
        "tabby_auth", "off", _choice("off", "keys"),
        doc="`off`: TabbyAPI runs with auth disabled on loopback; `keys`: it keeps its auth and the proxy uses its "
            "admin key (see the TabbyAPI section)")
    tabby_python: str | None = setting(
        "tabby_python", None, _program,
        doc="TabbyAPI's interpreter: a path containing `/` (relative to `config.yml`) or a command name looked up "
            "on `PATH`")

    metrics_public: bool = setting(
        "metrics_public", False, _flag,
        doc="`true` serves `/metrics` without a key, for a Prometheus scraper on a trusted network; otherwise it "
            "needs a key like every API route")
    request_log: str = setting(
        "request_log", "sqlite", _request_log, reload=False,
        doc="where one row per request goes: `sqlite` (`requests.sqlite3` in `state_dir`), a path to an SQLite "
            "file, a `postgresql://` URL (the password is never logged), or `off`. Never prompts or answers")
    request_log_days: float = setting("request_log_days", 30.0, _positive,
                                      doc="days the request log keeps its rows; older ones are deleted")
    peers: tuple[PeerSettings, ...] = setting(
        "peers", (), _peers, shown="none",
        doc="other instances of this proxy, on other machines, whose models this one lists and routes to: a list "
            "of `{name, url, api_key, prefer}` (see Several machines)")

    @property
    def request_slots(self) -> int:
        """Return how many requests may be in progress at once, all keys together (the threads not reserved)."""
        return self.threads - self.reserved_threads


@dataclass(frozen=True, slots=True)
class Setting:
    """One declared `proxy:` key, as reading, the reloader and the README test see it."""

    key: str           # its name under `proxy:` in config.yml
    attr: str          # its ProxySettings field
    default: Any
    read: Reader
    reload: bool       # False: only a restart applies it
    doc: str           # the README's Meaning column
    shown: str | None  # the README's Default column, where the plain default says too little


def _settings() -> tuple[Setting, ...]:
    declared = []
    for item in fields(ProxySettings):
        declaration = item.metadata.get(_DECLARATION)
        if declaration is None:  # fail at import: an undeclared field would be silently unreadable
            raise TypeError(f"ProxySettings.{item.name} is not declared with setting()")
        declared.append(Setting(declaration.key, item.name, item.default, declaration.read, declaration.reload,
                                declaration.doc, declaration.shown))
    return tuple(declared)


SETTINGS = _settings()
KNOWN_KEYS = frozenset(setting.key for setting in SETTINGS)
RESTART_ONLY = tuple(setting.attr for setting in SETTINGS if not setting.reload)  # field names


def read_proxy_settings(node: ConfigNode, base: Path) -> ProxySettings:
    """Read and check the `proxy:` section, key by key in declaration order; raise ConfigError."""
    node.reject_unknown(KNOWN_KEYS)
    reading = Reading(node, base, {})
    for declared in SETTINGS:
        reading.values[declared.attr] = declared.read(reading, declared.key, declared.default)
    return ProxySettings(**reading.values)
