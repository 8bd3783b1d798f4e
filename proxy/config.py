"""Configuration: config.yml (TabbyAPI's format plus a `proxy:` section) and the model profiles.

`load_config` validates everything once into the frozen `Config`; errors name the file, the key
path and the bad value. The keys are declared in `settings.py` (`proxy:`) and `profiles.py`
(profiles), which this module re-exports. Nothing here touches processes, sockets or Flask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType
from typing import Any

from proxy.config_node import ConfigError, ConfigNode, read_yaml
from proxy.profiles import (
    MACRO,
    TABBY_SECTIONS,
    CommandSettings,
    Details,
    LlamaCppSettings,
    ModelConfig,
    RemoteSettings,
    Template,
    deep_merge,
    is_pattern,
    read_profile,
)
from proxy.settings import ProxySettings, read_proxy_settings

__all__ = [
    "MACRO", "CommandSettings", "Config", "ConfigError", "Details", "LlamaCppSettings", "ModelConfig",
    "ProxySettings", "RemoteSettings", "Template", "deep_merge", "load_config", "with_models",
]


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    proxy: ProxySettings
    tabby: Mapping[str, Any]
    models: Mapping[str, ModelConfig]
    names: Mapping[str, str]  # lower-cased name or alias -> profile name
    default_model: str | None

    def resolve_model(self, requested: str) -> ModelConfig | None:
        """Return the profile for a client's model name, or None: a name or alias (or `name:latest`)
        exactly, else the longest alias pattern that matches it (`claude-*`; case-insensitive)."""
        key = requested.strip().lower()
        name = self.names.get(key)
        if name is None and key.endswith(":latest"):
            name = self.names.get(key[: -len(":latest")])
        if name is None:
            matches = [pattern for pattern in self.names if is_pattern(pattern) and fnmatchcase(key, pattern)]
            name = self.names[max(matches, key=len)] if matches else None
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
    raw = read_yaml(path, missing_ok=False)
    if not raw and not empty_ok:
        raise ConfigError(f"{path}: the file is empty (an empty config.yml would reset every setting)")
    base = path.parent
    proxy = read_proxy_settings(ConfigNode(raw.get("proxy") or {}, path, "proxy"), base)
    tabby = MappingProxyType({key: value for key, value in raw.items() if key in TABBY_SECTIONS})
    models: dict[str, ModelConfig] = {}
    if proxy.profiles_dir.is_dir():
        for profile_path in sorted(proxy.profiles_dir.glob("*.yml")) + sorted(proxy.profiles_dir.glob("*.yaml")):
            model = read_profile(profile_path, tabby, base)
            if model.name in models:
                raise ConfigError(f"{profile_path}: a profile named {model.name!r} already exists")
            models[model.name] = model
    elif "profiles_dir" in (raw.get("proxy") or {}):
        raise ConfigError(f"{path}: proxy.profiles_dir: no such directory {str(proxy.profiles_dir)!r}")
    names = _names(models)
    defaults = [model.name for model in models.values() if model.is_default]
    if len(defaults) > 1:
        raise ConfigError(f"{proxy.profiles_dir}: more than one profile says default: true: {', '.join(defaults)}")
    _check_memory(path, proxy, models)
    return Config(
        path=path,
        proxy=proxy,
        tabby=tabby,
        models=MappingProxyType(models),
        names=MappingProxyType(names),
        default_model=defaults[0] if defaults else None,
    )


def with_models(config: Config, models: Mapping[str, ModelConfig]) -> Config:
    """Return `config` serving `models` instead (the local profiles and the peers' models, proxy/peers.py).

    Raises ConfigError when two of them claim one name; the default stays the local one, if it is kept.
    """
    default = config.default_model if config.default_model in models else None
    return dataclasses.replace(config, models=MappingProxyType(dict(models)),
                               names=MappingProxyType(_names(models)), default_model=default)


def _names(models: Mapping[str, ModelConfig]) -> dict[str, str]:
    """Return every lower-cased name and alias with its profile; raise ConfigError on a clash."""
    names: dict[str, str] = {}
    for model in models.values():
        for name in (model.name, *model.aliases):
            owner = names.setdefault(name.lower(), model.name)
            if owner != model.name:
                key = "aliases" if name in model.aliases else "the file name"
                raise ConfigError(f"{model.source}: {key}: name {name!r} is already used by profile {owner!r}")
    return names


def _check_memory(path: Path, proxy: ProxySettings, models: Mapping[str, ModelConfig]) -> None:
    """Refuse a preload of an unknown model, and pins that would leave no room for any other model."""
    for name in proxy.preload:
        if name not in models:
            raise ConfigError(f"{path}: proxy.preload: no profile named {name!r} (known: {', '.join(models) or 'none'})")
    local = [model for model in models.values() if model.runs_here]  # a remote model takes no slot
    pinned = [model.name for model in local if model.pinned]
    if pinned and len(pinned) < len(local) and len(pinned) >= proxy.max_loaded_models:
        raise ConfigError(f"{path}: proxy.max_loaded_models is {proxy.max_loaded_models} but {len(pinned)} profile(s) "
                          f"are pinned ({', '.join(pinned)}): no other model could ever load; raise max_loaded_models")
