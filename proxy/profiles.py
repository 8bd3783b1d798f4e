"""Model profiles (model_configs/<name>.yml): the keys a profile and its `llamacpp:`, `command:` and
`remote:` sections may hold, declared once with their README rows, and reading one file into a frozen
`ModelConfig` merged over config.yml's TabbyAPI sections. Finding the files is `config.py`'s.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from proxy.config_node import ConfigError, ConfigNode, read_yaml
from proxy.endpoints import Endpoint, read_endpoint
from proxy.memory import Need, parse_size

TABBY_SECTIONS = (
    "network", "logging", "model", "draft_model", "lora", "embeddings", "sampling", "developer", "memory",
)
BACKEND_KINDS = ("tabbyapi", "llamacpp", "command", "remote")
LOAD_PROGRESS = ("comments", "reasoning", "off")
CAPABILITIES = ("completion", "tools", "vision", "embedding", "insert", "thinking")
DETAIL_KEYS = frozenset({"format", "family", "families", "parameter_size", "quantization_level", "size", "size_vram"})
TEMPLATE_TEXT_KEYS = frozenset({"system", "system_time", "system_time_format"})
DEFAULT_TIME_FORMAT = "%A, %d %B %Y, %H:%M %Z"
COMMAND_MACROS = ("PORT", "HOST", "MODEL", "PYTHON", "CONFIG_DIR")
MACRO = re.compile(r"\$\{([^}]*)\}")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ALIAS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/*?-]{0,255}")  # `*` and `?`: a pattern (see is_pattern)


@dataclass(frozen=True, slots=True)
class ProfileKey:
    """A key a profile or one of its sections may hold, with its README row (Default and Meaning)."""

    key: str
    default: str
    doc: str


PROFILE_KEYS = (
    ProfileKey("backend", "`tabbyapi`", "`tabbyapi`, `llamacpp`, `command`, or `remote` (a server the proxy does "
                                        "not start, see Several machines)"),
    ProfileKey("aliases", "none", "extra names (a string or a list); may contain `:` and `/`; `*` and `?` make "
                                  "a pattern (`claude-*`) that names not claimed exactly resolve to"),
    ProfileKey("default", "`false`", "used when a request names no model; at most one profile may set it"),
    ProfileKey("description", '`""`', "free text, shown in `/v1/models`"),
    ProfileKey("unload_timer", "`proxy.unload_timer`", "this model's idle time"),
    ProfileKey("startup_timeout", "`proxy.startup_timeout`", "seconds this model may take to become ready"),
    ProfileKey("template", "none", "request defaults, see below"),
    ProfileKey("details", "derived", "what Ollama clients are told: `format`, `family`, `families`, `parameter_size`, "
                                     "`quantization_level`, `size` and `size_vram` (bytes)"),
    ProfileKey("capabilities", "not declared",
               "a list of `completion`, `tools`, `vision`, `embedding`, `insert`, `thinking`; when set, Ollama "
               'requests needing anything else get a 400 (`"name" does not support tools`), and embedding requests '
               "on every route get a 400 unless it lists `embedding`"),
    ProfileKey("context_length", "derived", "the context size reported to Ollama clients; defaults to "
                                            "`llamacpp.n_ctx` or TabbyAPI's `model.max_seq_len`"),
    ProfileKey("license", '`""`', "shown by `/api/show`"),
    ProfileKey("resident_group", "none", "`tabbyapi` only: profiles with the same group share one TabbyAPI process "
                                         "and swap in place"),
    ProfileKey("tabby_config", "none", "`tabbyapi` only: extra TabbyAPI config sections, merged verbatim into the "
                                       "generated file"),
    ProfileKey("footprint", "learned or estimated", "the memory it takes once loaded, when the proxy counts memory "
                                                   "(`proxy.gpus`, `proxy.ram_budget`), see below"),
    ProfileKey("pinned", "`false`", "never evicted for another model; only `/unload`, a reload that changes it, "
                                    "or shutdown stops it"),
    ProfileKey("load_progress", "`comments`", "what an OpenAI stream that waits for this model's load shows: "
                                              "`comments` (SSE comments, invisible), `reasoning` (the progress as "
                                              "reasoning text, for chat UIs), or `off` (nothing until the answer)"),
    ProfileKey("llamacpp", "none", "`llamacpp` only: the GGUF and how to run it, see below"),
    ProfileKey("command", "none", "`command` only: the server's command line and readiness, see below"),
    ProfileKey("remote", "none", "`remote` only: the server's URL, key and model id, see Several machines"),
)  # and TabbyAPI's sections (TABBY_SECTIONS), merged over config.yml's
LLAMACPP_KEYS = (
    ProfileKey("model_path", "—", "a GGUF file"),
    ProfileKey("model_package", "—", "a Python package that ships the GGUF, located without importing it; "
                                     "needs `model_file`"),
    ProfileKey("model_file", "—", "the GGUF's file name inside `model_package`"),
    ProfileKey("n_ctx", "`2048`", "context size"),
    ProfileKey("threads", "llama.cpp's", "CPU threads"),
    ProfileKey("n_parallel", "`1`", "parallel slots"),
    ProfileKey("n_gpu_layers", "llama.cpp's", "layers to offload"),
    ProfileKey("embedding", "`false`", "also serve embeddings (mean pooling); without it `/v1/embeddings`, "
                                       "`/api/embed` and `/api/embeddings` answer 400 without loading the model"),
)
FOOTPRINT_KEYS = (
    ProfileKey("vram", "none", 'GPU memory: a size (`"22GiB"`, `"512MiB"`, `"24GB"`), or a list of sizes, one per '
                               "device in `gpus`"),
    ProfileKey("gpus", "the one where it fits best", "the GPU indices it runs on (all of them: a split); the "
                                                     "backend is told them (`CUDA_VISIBLE_DEVICES`)"),
    ProfileKey("ram", "none", "system memory, for CPU backends (counted against `proxy.ram_budget`)"),
)
COMMAND_KEYS = (
    ProfileKey("cmd", "required", "a string (split like a shell does, but no shell runs) or a list; must contain "
                                  "`${PORT}`"),
    ProfileKey("health_path", "`/health`", "path that must answer 200 before the model counts as ready; `none` "
                                           "means ready as soon as anything answers HTTP on `/`"),
    ProfileKey("env", "none", "extra environment variables, added to the proxy's environment"),
    ProfileKey("cwd", "the proxy's working directory", "working directory; macros allowed; relative to "
                                                       "`config.yml`'s folder"),
    ProfileKey("model_id", "the profile name", "the id the server serves; when set (and `health_path` is not "
                                               "`none`), readiness also requires it in `/v1/models`"),
    ProfileKey("stop_cmd", "none (signals)", "a command run to stop the server instead of signals, with the same "
                                             "macros (`docker stop ${MODEL}-${PORT}`), for servers that are not the "
                                             "proxy's children; the signals follow if the server is still up after "
                                             "`stop_grace`"),
)

REMOTE_KEYS = (
    ProfileKey("url", "required", "the server's root URL (`http://gpu-box:8080`; a trailing `/v1` is tolerated); "
                                  "a user and password in it are sent as Basic auth and never shown"),
    ProfileKey("api_key", "none", "the key sent to it as `Authorization: Bearer`; never logged"),
    ProfileKey("api_key_env", "none", "the name of an environment variable that holds the key, read at start "
                                      "(and at each reload) instead of `api_key`"),
    ProfileKey("model_id", "the profile name", "the id the server serves the model by; when set, readiness "
                                               "also requires it in the server's `/v1/models`"),
    ProfileKey("timeout", "`10`", "seconds the readiness check (`GET /v1/models`) may take"),
)


def _names(keys: tuple[ProfileKey, ...]) -> frozenset[str]:
    return frozenset(key.key for key in keys)


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
    stop_argv: tuple[str, ...] | None = None  # stop_cmd, split like cmd


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    """A server that runs elsewhere and that the proxy never starts: a `remote` profile, or a peer's model."""

    endpoint: Endpoint
    model_id: str | None = None
    timeout_s: float = 10.0
    peer: str | None = None    # the peer proxy (proxy.peers) that lists it; None for a `remote` profile
    serves: str | None = None  # the backend kind the peer runs it on, when it says: whose sampler names apply


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
    remote: RemoteSettings | None = None
    backend_model: str | None = None  # the id the backend knows it by, when not the name
    details: Details = field(default_factory=Details)
    capabilities: tuple[str, ...] | None = None  # None: not declared, nothing is refused
    context_length: int | None = None
    license: str = ""
    resident_group: str | None = None  # tabbyapi profiles sharing one process, swapped in place
    footprint: Need | None = None      # declared; None: learned or estimated (proxy/footprints.py)
    pinned: bool = False
    load_progress: str = "comments"  # comments, reasoning or off
    devices: tuple[int, ...] | None = None  # the GPUs the scheduler placed it on: set on the launcher's copy only

    @property
    def upstream_model(self) -> str:
        """Return the model id the backend knows this model by."""
        return self.backend_model or self.name

    @property
    def runs_here(self) -> bool:
        """Say whether the backend runs on this machine: it takes a slot of max_loaded_models and memory."""
        return self.remote is None

    @property
    def sampler_kind(self) -> str:
        """Return the backend kind whose sampler field names requests use (a peer's model: the peer's kind)."""
        return self.remote.serves if self.remote is not None and self.remote.serves else self.backend


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return base with override merged in, key by key; nested mappings merge, others replace."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_profile(path: Path, tabby: Mapping[str, Any], base: Path) -> ModelConfig:
    """Read one profile over config.yml's TabbyAPI sections; raise ConfigError naming what is wrong."""
    name = path.stem
    if not MODEL_NAME.fullmatch(name):
        raise ConfigError(f"{path}: the file name is the model's name and must match {MODEL_NAME.pattern}")
    node = ConfigNode(read_yaml(path, missing_ok=False), path, "")
    node.reject_unknown(_names(PROFILE_KEYS) | set(TABBY_SECTIONS))
    backend = node.get("backend", str, "tabbyapi")
    if backend not in BACKEND_KINDS:
        raise node.fail("backend", f"expected one of {', '.join(BACKEND_KINDS)}, got {backend!r}")
    aliases = _aliases(node)
    startup = node.value.get("startup_timeout")
    if startup is not None:
        node.positive("startup_timeout", 1.0)
    extra = node.get("tabby_config", dict, {})  # TabbyAPI sections the proxy does not know, verbatim
    resident_group = node.get("resident_group", str, None)
    if resident_group is not None and backend != "tabbyapi":
        raise node.fail("resident_group", f"only tabbyapi profiles can share a resident process, not {backend}")
    overrides = _tabby_overrides(node, extra)
    command = _command(node.child("command"), base) if backend == "command" else None
    remote = _remote(node.child("remote")) if backend == "remote" else None
    if remote is not None and node.value.get("footprint") is not None:
        raise node.fail("footprint", "a remote model takes no memory on this machine; remove the footprint")
    capabilities = node.get("capabilities", list, None)
    if capabilities is not None and not set(capabilities) <= set(CAPABILITIES):
        raise node.fail("capabilities", f"expected a list of {', '.join(CAPABILITIES)}, got {capabilities!r}")
    context_length = node.value.get("context_length")
    if context_length is not None:
        context_length = node.positive("context_length", 1, integer=True)
    return ModelConfig(
        name=name,
        backend=backend,
        source=path,
        aliases=aliases,
        is_default=node.get("default", bool, False),
        description=node.get("description", str, ""),
        unload_timer_s=node.duration("unload_timer", None),
        startup_timeout_s=None if startup is None else float(startup),
        template=_template(node.child("template")),
        tabby=MappingProxyType(deep_merge(tabby, overrides)),
        llamacpp=_llamacpp(node.child("llamacpp"), base) if backend == "llamacpp" else None,
        command=command,
        remote=remote,
        backend_model=remote.model_id if remote is not None else _backend_model(node, backend, command),
        details=_details(node.child("details")),
        capabilities=None if capabilities is None else tuple(capabilities),
        context_length=context_length,
        license=node.get("license", str, ""),
        resident_group=resident_group,
        footprint=_footprint(node.child("footprint")) if node.value.get("footprint") is not None else None,
        pinned=node.get("pinned", bool, False),
        load_progress=_load_progress(node),
    )


def is_pattern(name: str) -> bool:
    """Say whether an alias is a glob pattern (`claude-*`, `gpt-?`) rather than a name."""
    return "*" in name or "?" in name


def _aliases(node: ConfigNode) -> tuple[str, ...]:
    aliases = node.get("aliases", (list, str), [])
    aliases = [aliases] if isinstance(aliases, str) else aliases
    for alias in aliases:
        if not isinstance(alias, str) or not ALIAS_NAME.fullmatch(alias):
            raise node.fail("aliases", f"expected names matching {ALIAS_NAME.pattern}, got {alias!r}")
    return tuple(aliases)


def _tabby_overrides(node: ConfigNode, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Return the profile's TabbyAPI sections, its tabby_config's merged under them."""
    overrides = deep_merge(extra, {key: node.value[key] for key in TABBY_SECTIONS if key in node.value})
    for key, value in overrides.items():
        if not isinstance(value, Mapping):
            raise node.fail(key, f"expected a mapping (a TabbyAPI config section), got {value!r}")
    return overrides


def _backend_model(node: ConfigNode, backend: str, command: CommandSettings | None) -> str | None:
    if backend == "tabbyapi":
        # Only the profile names its TabbyAPI model: config.yml's model_name must not leak into
        # every profile. Without one, the model folder is the profile's name.
        model_name: str | None = node.child("model").get("model_name", str, None)
        return model_name
    return None if command is None else command.model_id


def _details(node: ConfigNode) -> Details:
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


def _load_progress(node: ConfigNode) -> str:
    mode: str = node.get("load_progress", str, "comments")
    if mode not in LOAD_PROGRESS:
        raise node.fail("load_progress", f"expected one of {', '.join(LOAD_PROGRESS)}, got {mode!r}")
    return mode


def _footprint(node: ConfigNode) -> Need:
    node.reject_unknown(_names(FOOTPRINT_KEYS))
    gpus = node.get("gpus", (list, int), None)
    gpus = [gpus] if isinstance(gpus, int) else gpus
    if gpus is not None and (not gpus or len(set(gpus)) != len(gpus)
                             or not all(isinstance(index, int) and not isinstance(index, bool) and index >= 0
                                        for index in gpus)):
        raise node.fail("gpus", f"expected GPU indices (0, 1, ...), each once, got {gpus!r}")
    vram = node.value.get("vram")
    split = None
    try:
        if isinstance(vram, list):
            split = tuple(parse_size(size) for size in vram)
            if gpus is None or len(gpus) != len(split):
                raise node.fail("vram", f"a list of sizes needs `gpus` with one index per size, got {vram!r}")
        total = sum(split) if split is not None else (0 if vram is None else parse_size(vram))
    except ValueError as exc:
        raise node.fail("vram", str(exc)) from None
    try:
        ram = parse_size(node.value.get("ram", 0))
    except ValueError as exc:
        raise node.fail("ram", str(exc)) from None
    if not total and not ram:
        raise node.fail("vram", "a footprint needs `vram`, `ram` or both")
    return Need(total, ram, None if gpus is None else tuple(gpus), split, "declared")


def _remote(node: ConfigNode) -> RemoteSettings:
    node.reject_unknown(_names(REMOTE_KEYS))
    return RemoteSettings(
        endpoint=read_endpoint(node),
        model_id=node.get("model_id", str, None),
        timeout_s=float(node.positive("timeout", 10.0)),
    )


def _template(node: ConfigNode) -> Template:
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


def _llamacpp(node: ConfigNode, base: Path) -> LlamaCppSettings:
    node.reject_unknown(_names(LLAMACPP_KEYS))
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


def _command(node: ConfigNode, base: Path) -> CommandSettings:
    node.reject_unknown(_names(COMMAND_KEYS))
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
    stop = node.get("stop_cmd", (list, str), None)
    stop_argv = None if stop is None else shlex.split(stop) if isinstance(stop, str) else stop
    if stop_argv is not None and (not stop_argv or not all(isinstance(arg, str | int | float) for arg in stop_argv)):
        raise node.fail("stop_cmd", f"expected a command line (a string or a list), got {stop!r}")
    for key, texts in (("cmd", argv), ("env", env.values()), ("cwd", [cwd] if cwd else []),
                       ("stop_cmd", stop_argv or [])):
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
        stop_argv=None if stop_argv is None else tuple(str(arg) for arg in stop_argv),
    )

