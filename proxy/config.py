"""Configuration: config.yml (TabbyAPI's format plus a `proxy:` section) and the model profiles.

Everything is validated once into frozen dataclasses; errors name the file, the key path and the
bad value. Nothing here touches processes, sockets or Flask.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from proxy.durations import parse_keep_alive
from proxy.errors import BadRequest

TABBY_SECTIONS = (
    "network", "logging", "model", "draft_model", "lora", "embeddings", "sampling", "developer", "memory",
)
BACKEND_KINDS = ("tabbyapi", "llamacpp", "command")
PROFILE_KEYS = frozenset(
    {"backend", "aliases", "default", "unload_timer", "startup_timeout", "template", "llamacpp", "command",
     "description", "details", "capabilities", "context_length", "license", "resident_group", "tabby_config",
     *TABBY_SECTIONS}
)
CAPABILITIES = ("completion", "tools", "vision", "embedding", "insert", "thinking")
DETAIL_KEYS = frozenset({"format", "family", "families", "parameter_size", "quantization_level", "size", "size_vram"})
TEMPLATE_TEXT_KEYS = frozenset({"system", "system_time", "system_time_format"})
DEFAULT_OLLAMA_VERSION = "0.12.6"  # what /api/version reports; clients enable features by it
DEFAULT_TIME_FORMAT = "%A, %d %B %Y, %H:%M %Z"
COMMAND_MACROS = ("PORT", "HOST", "MODEL", "PYTHON", "CONFIG_DIR")
MACRO = re.compile(r"\$\{([^}]*)\}")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ALIAS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,255}")


class ConfigError(Exception):
    """A configuration file is invalid; the message names the file, the key and the problem."""


@dataclass(frozen=True, slots=True)
class ProxySettings:
    host: str = "127.0.0.1"
    port: int = 9000
    threads: int = 64
    unload_timer_s: float = 300.0
    max_loaded_models: int = 1
    startup_timeout_s: float = 600.0
    stop_grace_s: float = 10.0
    queue_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    backend_ports: tuple[int, int] = (5001, 5999)
    profiles_dir: Path = Path("model_configs")
    api_tokens_path: Path = Path("api_tokens.yml")
    state_dir: Path = Path("run")
    disable_auth: bool = False
    tabby_dir: Path | None = None
    tabby_python: str | None = None
    tabby_auth: str = "off"  # "off": TabbyAPI runs with auth disabled on loopback; "keys": it keeps its keys
    max_body_mb: float = 64.0      # larger request bodies get 413
    max_answer_mb: float = 256.0   # the most of one backend answer held in memory to translate it; 502 beyond
    max_concurrent: int = 0        # requests per model at once (0: no limit); more wait in the queue
    max_queue: int = 28            # requests waiting for a model, all models together; more get 503
    drain_timeout_s: float = 30.0  # on SIGTERM, how long running answers may take to finish
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; none by default
    log_bodies: bool = False       # log request bodies at DEBUG (prompts!); off by default
    ollama_version: str = DEFAULT_OLLAMA_VERSION
    # Admission and the HTTP server's limits (proxy/admission.py, proxy/server.py)
    reserved_threads: int = 8      # threads kept for /health, /ping, admin routes and rejections
    key_max_concurrent: int = 16   # requests in progress per key without its own max_concurrent (0: none)
    client_timeout_s: float = 60.0  # a client that accepts no byte of its answer this long is cut off
    connection_limit: int = 1000   # open client connections; more wait in the OS's listen backlog
    channel_timeout_s: float = 30.0  # an idle keep-alive connection is closed after this
    header_timeout_s: float = 10.0   # from a request's first byte until its headers are complete
    body_timeout_s: float = 60.0     # from the end of the headers until the whole body has arrived

    @property
    def request_slots(self) -> int:
        """Return how many requests may be in progress at once, all keys together (the threads not reserved)."""
        return self.threads - self.reserved_threads


@dataclass(frozen=True, slots=True)
class Details:
    """What Ollama clients are told about a model (/api/tags, /api/show, /api/ps)."""

    format: str = ""
    family: str = ""
    families: tuple[str, ...] = ()
    parameter_size: str = ""
    quantization_level: str = ""
    size: int | None = None        # bytes; None: measured from the model's files
    size_vram: int | None = None   # bytes on the GPU; None: derived from the backend


@dataclass(frozen=True, slots=True)
class Template:
    """Request defaults of a profile: a system prompt, the date/time, sampler settings."""

    system: str | None = None
    system_time: bool = False
    system_time_format: str = DEFAULT_TIME_FORMAT
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class LlamaCppSettings:
    """How to run a GGUF under llama.cpp's server (the xllamacpp package)."""

    model_path: Path | None = None
    model_package: str | None = None
    model_file: str | None = None
    n_ctx: int = 2048
    threads: int | None = None
    n_parallel: int = 1
    n_gpu_layers: int | None = None
    embedding: bool = False


@dataclass(frozen=True, slots=True)
class CommandSettings:
    """Any OpenAI-compatible server started from a command line with ${PORT} and other macros."""

    argv: tuple[str, ...]
    health_path: str | None = "/health"
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    cwd: str | None = None  # macros allowed; relative to config.yml's folder once expanded
    model_id: str | None = None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One profile from model_configs/<name>.yml, merged over config.yml."""

    name: str
    backend: str
    source: Path
    aliases: tuple[str, ...] = ()
    is_default: bool = False
    description: str = ""
    unload_timer_s: float | None = None
    startup_timeout_s: float | None = None
    template: Template = field(default_factory=Template)
    tabby: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    llamacpp: LlamaCppSettings | None = None
    command: CommandSettings | None = None
    backend_model: str | None = None  # the id the backend knows it by, when not the name
    details: Details = field(default_factory=Details)
    capabilities: tuple[str, ...] | None = None  # None: not declared, nothing is refused
    context_length: int | None = None
    license: str = ""
    resident_group: str | None = None  # tabbyapi profiles sharing one process, swapped in place

    @property
    def upstream_model(self) -> str:
        """Return the model id the backend knows this model by."""
        return self.backend_model or self.name


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    proxy: ProxySettings
    tabby: Mapping[str, Any]
    models: Mapping[str, ModelConfig]
    names: Mapping[str, str]  # lower-cased name or alias -> profile name
    default_model: str | None

    def resolve_model(self, requested: str) -> ModelConfig | None:
        """Return the profile for a client's model name (name, alias, `name:latest`), or None."""
        key = requested.strip().lower()
        name = self.names.get(key)
        if name is None and key.endswith(":latest"):
            name = self.names.get(key[: -len(":latest")])
        return None if name is None else self.models[name]

    def idle_timeout_s(self, model: ModelConfig) -> float:
        """Return the idle time before unloading a model when no request has said otherwise."""
        return self.proxy.unload_timer_s if model.unload_timer_s is None else model.unload_timer_s

    def startup_timeout_s(self, model: ModelConfig) -> float:
        return self.proxy.startup_timeout_s if model.startup_timeout_s is None else model.startup_timeout_s


def load_config(path: str | Path, *, empty_ok: bool = True) -> Config:
    """Read config.yml and every profile it points at; raise ConfigError naming what is wrong.

    An empty config.yml means every default (a first start); a reload passes empty_ok=False, so
    a file emptied under a running proxy is refused instead of resetting every setting.
    """
    path = Path(path).resolve()
    raw = _read_yaml(path, missing_ok=False)
    if not raw and not empty_ok:
        raise ConfigError(f"{path}: the file is empty (an empty config.yml would reset every setting)")
    base = path.parent
    proxy = _proxy_settings(_Node(raw.get("proxy") or {}, path, "proxy"), base)
    tabby = MappingProxyType({key: value for key, value in raw.items() if key in TABBY_SECTIONS})
    models: dict[str, ModelConfig] = {}
    if proxy.profiles_dir.is_dir():
        for profile_path in sorted(proxy.profiles_dir.glob("*.yml")) + sorted(proxy.profiles_dir.glob("*.yaml")):
            model = _model_config(profile_path, tabby, base)
            if model.name in models:
                raise ConfigError(f"{profile_path}: a profile named {model.name!r} already exists")
            models[model.name] = model
    elif "profiles_dir" in (raw.get("proxy") or {}):
        raise ConfigError(f"{path}: proxy.profiles_dir: no such directory {str(proxy.profiles_dir)!r}")
    names: dict[str, str] = {}
    for model in models.values():
        for name in (model.name, *model.aliases):
            owner = names.setdefault(name.lower(), model.name)
            if owner != model.name:
                key = "aliases" if name in model.aliases else "the file name"
                raise ConfigError(f"{model.source}: {key}: name {name!r} is already used by profile {owner!r}")
    defaults = [model.name for model in models.values() if model.is_default]
    if len(defaults) > 1:
        raise ConfigError(f"{proxy.profiles_dir}: more than one profile says default: true: {', '.join(defaults)}")
    return Config(
        path=path,
        proxy=proxy,
        tabby=tabby,
        models=MappingProxyType(models),
        names=MappingProxyType(names),
        default_model=defaults[0] if defaults else None,
    )


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return base with override merged in, key by key; nested mappings merge, others replace."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _Node:
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

    def child(self, key: str) -> _Node:
        return _Node(self.value.get(key) or {}, self.file, f"{self.where}.{key}" if self.where else key)

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


def _read_yaml(path: Path, *, missing_ok: bool) -> dict[str, Any]:
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


def _proxy_settings(node: _Node, base: Path) -> ProxySettings:
    node.reject_unknown({
        "host", "port", "threads", "unload_timer", "max_loaded_models", "startup_timeout", "stop_grace",
        "queue_timeout", "connect_timeout", "read_timeout", "backend_ports", "profiles_dir", "api_tokens",
        "state_dir", "disable_auth", "tabby_dir", "tabby_python", "tabby_auth", "ollama_version",
        "max_body_mb", "max_answer_mb", "max_concurrent", "max_queue", "drain_timeout", "cors_origins", "log_bodies",
        "reserved_threads", "key_max_concurrent", "client_timeout", "connection_limit", "channel_timeout",
        "header_timeout", "body_timeout",
    })
    defaults = ProxySettings()
    threads, reserved_threads, max_queue = _admission(node, defaults)
    port = node.get("port", int, defaults.port)
    if not 0 < port < 65536:
        raise node.fail("port", f"expected a TCP port 1-65535, got {port}")
    unload_timer = node.duration("unload_timer", defaults.unload_timer_s)
    assert unload_timer is not None
    ports = node.get("backend_ports", (list, str), None)
    backend_ports = defaults.backend_ports if ports is None else _port_range(node, ports)
    tabby_dir = node.path("tabby_dir", base, None)
    return ProxySettings(
        host=node.get("host", str, defaults.host),
        port=port,
        threads=threads,
        unload_timer_s=unload_timer,
        max_loaded_models=node.positive("max_loaded_models", defaults.max_loaded_models, integer=True),
        startup_timeout_s=float(node.positive("startup_timeout", defaults.startup_timeout_s)),
        stop_grace_s=float(node.positive("stop_grace", defaults.stop_grace_s)),
        queue_timeout_s=float(node.positive("queue_timeout", defaults.queue_timeout_s)),
        connect_timeout_s=float(node.positive("connect_timeout", defaults.connect_timeout_s)),
        read_timeout_s=float(node.positive("read_timeout", defaults.read_timeout_s)),
        backend_ports=backend_ports,
        profiles_dir=node.path("profiles_dir", base, defaults.profiles_dir) or base,
        api_tokens_path=node.path("api_tokens", base, defaults.api_tokens_path) or base,
        state_dir=node.path("state_dir", base, defaults.state_dir) or base,
        disable_auth=node.get("disable_auth", bool, defaults.disable_auth),
        tabby_dir=tabby_dir,
        tabby_python=_program(node.get("tabby_python", str, None), base),
        tabby_auth=_choice(node, "tabby_auth", ("off", "keys"), "off"),
        max_body_mb=float(node.positive("max_body_mb", defaults.max_body_mb)),
        max_answer_mb=float(node.positive("max_answer_mb", defaults.max_answer_mb)),
        max_concurrent=_non_negative(node, "max_concurrent", defaults.max_concurrent),
        max_queue=max_queue,
        drain_timeout_s=float(_non_negative(node, "drain_timeout", defaults.drain_timeout_s)),
        cors_origins=_origins(node),
        log_bodies=node.get("log_bodies", bool, False),
        ollama_version=_semver(node),
        reserved_threads=reserved_threads,
        key_max_concurrent=_count(node, "key_max_concurrent", defaults.key_max_concurrent),
        client_timeout_s=float(node.positive("client_timeout", defaults.client_timeout_s)),
        connection_limit=node.positive("connection_limit", defaults.connection_limit, integer=True),
        channel_timeout_s=float(node.positive("channel_timeout", defaults.channel_timeout_s)),
        header_timeout_s=float(node.positive("header_timeout", defaults.header_timeout_s)),
        body_timeout_s=float(node.positive("body_timeout", defaults.body_timeout_s)),
    )


def _admission(node: _Node, defaults: ProxySettings) -> tuple[int, int, int]:
    """Return threads, reserved_threads and max_queue, checked against each other.

    Every request in progress holds a thread, a waiting one included: the reserve keeps some for
    /health and admin routes, and a queue longer than the request slots could never fill.
    """
    threads = node.positive("threads", defaults.threads, integer=True)
    if threads < 2:
        raise node.fail("threads", f"expected at least 2 (one is kept for /health and admin routes), got {threads}")
    reserved = node.positive("reserved_threads", max(1, min(defaults.reserved_threads, threads // 4)), integer=True)
    if reserved >= threads:
        raise node.fail("reserved_threads", f"expected fewer than threads ({threads}), got {reserved}")
    slots = threads - reserved
    max_queue = node.positive("max_queue", max(1, slots // 2), integer=True)
    if max_queue > slots:
        raise node.fail("max_queue", f"{max_queue} can never be reached: each waiting request holds one of the "
                                     f"{slots} request slots (threads - reserved_threads); set at most {slots}")
    return threads, reserved, max_queue


def _count(node: _Node, key: str, default: int) -> int:
    value: int = node.get(key, int, default)
    if value < 0:
        raise node.fail(key, f"expected a whole number >= 0 (0: no limit), got {value!r}")
    return value


def _non_negative(node: _Node, key: str, default: float) -> Any:
    value = node.get(key, (int, float), default)
    if value < 0:
        raise node.fail(key, f"expected a number >= 0, got {value!r}")
    return value


def _origins(node: _Node) -> tuple[str, ...]:
    origins = node.get("cors_origins", (list, str), [])
    origins = [origins] if isinstance(origins, str) else origins
    for origin in origins:
        if not isinstance(origin, str) or not (origin == "*" or re.fullmatch(r"https?://[^/\s]+", origin)):
            raise node.fail("cors_origins", f'expected origins like "https://chat.example.org", got {origin!r}')
    return tuple(origins)


def _choice(node: _Node, key: str, choices: tuple[str, ...], default: str) -> str:
    value: str = node.get(key, str, default)
    if value not in choices:
        raise node.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def _semver(node: _Node) -> str:
    version: str = node.get("ollama_version", str, DEFAULT_OLLAMA_VERSION)
    if not re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", version):
        raise node.fail("ollama_version", f'expected a plain version like "0.12.6" (clients parse it), got {version!r}')
    return version


def _program(value: str | None, base: Path) -> str | None:
    """Resolve a relative program path (one with a slash) against the config's folder."""
    if value is None or "/" not in value:
        return value
    return str((base / Path(value).expanduser()).resolve())


def _port_range(node: _Node, value: list[Any] | str) -> tuple[int, int]:
    parts = value.split("-") if isinstance(value, str) else value
    try:
        low, high = (int(part) for part in parts)
    except (TypeError, ValueError):
        raise node.fail("backend_ports", f'expected a range like "5001-5999" or [5001, 5999], got {value!r}') from None
    if not 0 < low <= high < 65536:
        raise node.fail("backend_ports", f"expected 1 <= low <= high <= 65535, got {low}-{high}")
    return low, high


def _model_config(path: Path, tabby: Mapping[str, Any], base: Path) -> ModelConfig:
    name = path.stem
    if not MODEL_NAME.fullmatch(name):
        raise ConfigError(f"{path}: the file name is the model's name and must match {MODEL_NAME.pattern}")
    node = _Node(_read_yaml(path, missing_ok=False), path, "")
    node.reject_unknown(PROFILE_KEYS)
    backend = node.get("backend", str, "tabbyapi")
    if backend not in BACKEND_KINDS:
        raise node.fail("backend", f"expected one of {', '.join(BACKEND_KINDS)}, got {backend!r}")
    aliases = node.get("aliases", (list, str), [])
    aliases = [aliases] if isinstance(aliases, str) else aliases
    for alias in aliases:
        if not isinstance(alias, str) or not ALIAS_NAME.fullmatch(alias):
            raise node.fail("aliases", f"expected names matching {ALIAS_NAME.pattern}, got {alias!r}")
    startup = node.value.get("startup_timeout")
    if startup is not None:
        node.positive("startup_timeout", 1.0)
    overrides = {key: node.value[key] for key in TABBY_SECTIONS if key in node.value}
    extra = node.get("tabby_config", dict, {})  # TabbyAPI sections the proxy does not know, verbatim
    overrides = deep_merge(extra, overrides)
    resident_group = node.get("resident_group", str, None)
    if resident_group is not None and backend != "tabbyapi":
        raise node.fail("resident_group", f"only tabbyapi profiles can share a resident process, not {backend}")
    for key, value in overrides.items():
        if not isinstance(value, Mapping):
            raise node.fail(key, f"expected a mapping (a TabbyAPI config section), got {value!r}")
    command = _command(node.child("command"), base) if backend == "command" else None
    capabilities = node.get("capabilities", list, None)
    if capabilities is not None and not set(capabilities) <= set(CAPABILITIES):
        raise node.fail("capabilities", f"expected a list of {', '.join(CAPABILITIES)}, got {capabilities!r}")
    context_length = node.value.get("context_length")
    if context_length is not None:
        context_length = node.positive("context_length", 1, integer=True)
    backend_model = None
    if backend == "tabbyapi":
        # Only the profile names its TabbyAPI model: config.yml's model_name must not leak into
        # every profile. Without one, the model folder is the profile's name.
        backend_model = node.child("model").get("model_name", str, None)
    elif command is not None:
        backend_model = command.model_id
    return ModelConfig(
        name=name,
        backend=backend,
        source=path,
        aliases=tuple(aliases),
        is_default=node.get("default", bool, False),
        description=node.get("description", str, ""),
        unload_timer_s=node.duration("unload_timer", None),
        startup_timeout_s=None if startup is None else float(startup),
        template=_template(node.child("template")),
        tabby=MappingProxyType(deep_merge(tabby, overrides)),
        llamacpp=_llamacpp(node.child("llamacpp"), base) if backend == "llamacpp" else None,
        command=command,
        backend_model=backend_model,
        details=_details(node.child("details")),
        capabilities=None if capabilities is None else tuple(capabilities),
        context_length=context_length,
        license=node.get("license", str, ""),
        resident_group=resident_group,
    )


def _details(node: _Node) -> Details:
    node.reject_unknown(DETAIL_KEYS)
    families = node.get("families", list, None)
    family = node.get("family", str, "")
    sizes = {key: node.get(key, int, None) for key in ("size", "size_vram")}
    for key, value in sizes.items():
        if value is not None and value < 0:
            raise node.fail(key, f"expected bytes (an integer >= 0), got {value!r}")
    return Details(
        format=node.get("format", str, ""),
        family=family,
        families=tuple(str(item) for item in families) if families is not None else ((family,) if family else ()),
        parameter_size=str(node.get("parameter_size", (str, int, float), "")),
        quantization_level=node.get("quantization_level", str, ""),
        size=sizes["size"],
        size_vram=sizes["size_vram"],
    )


def _template(node: _Node) -> Template:
    defaults = {key: value for key, value in node.value.items() if key not in TEMPLATE_TEXT_KEYS}
    for key, value in defaults.items():
        if not isinstance(key, str) or isinstance(value, Mapping):
            raise node.fail(str(key), f"expected a request default (a number, string, bool or list), got {value!r}")
    return Template(
        system=node.get("system", str, None),
        system_time=node.get("system_time", bool, False),
        system_time_format=node.get("system_time_format", str, DEFAULT_TIME_FORMAT),
        defaults=MappingProxyType(defaults),
    )


def _llamacpp(node: _Node, base: Path) -> LlamaCppSettings:
    node.reject_unknown({"model_path", "model_package", "model_file", "n_ctx", "threads", "n_parallel",
                         "n_gpu_layers", "embedding"})
    package = node.get("model_package", str, None)
    model_path = node.path("model_path", base, None)
    if (package is None) == (model_path is None):
        raise node.fail("model_path", "set either model_path (a GGUF file) or model_package + model_file")
    model_file = node.get("model_file", str, None)
    if package is not None and not model_file:
        raise node.fail("model_file", "model_package needs model_file, the GGUF's name inside the package")
    threads = node.value.get("threads")
    return LlamaCppSettings(
        model_path=model_path,
        model_package=package,
        model_file=model_file,
        n_ctx=node.positive("n_ctx", 2048, integer=True),
        threads=None if threads is None else node.positive("threads", 1, integer=True),
        n_parallel=node.positive("n_parallel", 1, integer=True),
        n_gpu_layers=node.get("n_gpu_layers", int, None),
        embedding=node.get("embedding", bool, False),
    )


def _command(node: _Node, base: Path) -> CommandSettings:
    node.reject_unknown({"cmd", "health_path", "env", "cwd", "model_id"})
    cmd = node.get("cmd", (list, str), None)
    if not cmd:
        raise node.fail("cmd", "required: the command line that starts the server, with ${PORT}")
    argv = shlex.split(cmd) if isinstance(cmd, str) else cmd
    if not all(isinstance(arg, str | int | float) for arg in argv):
        raise node.fail("cmd", f"expected strings, got {cmd!r}")
    if not any("${PORT}" in str(arg) for arg in argv):
        raise node.fail("cmd", f"must contain ${{PORT}}, the port the proxy chose for the server; got {cmd!r}")
    health = node.value.get("health_path", "/health")
    if health is not None and (not isinstance(health, str) or not (health.startswith("/") or health == "none")):
        raise node.fail("health_path", f'expected a path like "/health" or "none", got {health!r}')
    env = node.get("env", dict, {})
    cwd = node.get("cwd", str, None)
    for key, texts in (("cmd", argv), ("env", env.values()), ("cwd", [cwd] if cwd else [])):
        for text in texts:
            unknown = set(MACRO.findall(str(text))) - set(COMMAND_MACROS)
            if unknown:
                raise node.fail(key, f"unknown macro ${{{sorted(unknown)[0]}}} in {text!r}; known: "
                                     + ", ".join("${" + name + "}" for name in COMMAND_MACROS))
    return CommandSettings(
        argv=tuple(str(arg) for arg in argv),
        health_path=None if health in (None, "none") else health,
        env=MappingProxyType({str(key): str(value) for key, value in env.items()}),
        cwd=cwd,
        model_id=node.get("model_id", str, None),
    )
