"""The `tabbyapi` launcher: TabbyAPI's main.py with a config file generated for each launch.

TabbyAPI ignores its other CLI flags under --config and still reads its folder's config.yml
underneath, so the generated file sets every key that matters explicitly.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from proxy.backends import LaunchPlan, http_get, visible_devices
from proxy.config import Config, ModelConfig, deep_merge
from proxy.auth import create_tokens_file
from proxy.errors import BackendFailed


def plan(model: ModelConfig, config: Config, port: int) -> LaunchPlan:
    tabby_dir = config.proxy.tabby_dir
    if tabby_dir is None or not (tabby_dir / "main.py").is_file():
        raise BackendFailed(
            f"{model.name}: TabbyAPI not found: set proxy.tabby_dir in {config.path.name} to a TabbyAPI "
            f"checkout (the folder with main.py); now {str(tabby_dir) if tabby_dir else 'unset'}"
        )
    keys = backend_keys(model, tabby_dir) if config.proxy.tabby_auth == "keys" else None
    generated = tabby_config(model, port, auth=keys is not None)
    config_path = config.proxy.state_dir / "tabby" / f"{model.name}.yml"
    expected = model.upstream_model
    headers = admin_headers(keys) if keys else {}

    def probe() -> bool:
        # TabbyAPI loads its start-up model before binding, so "refused" means "still loading".
        answer = http_get(port, "/v1/model", headers)
        if answer is None:
            return False
        status, card = answer
        if status == 200:
            served = card.get("id") if isinstance(card, dict) else None
            if served != expected:
                raise BackendFailed(f"{model.name}: the server on port {port} serves {served!r}, not "
                                    f"{expected!r}; is another TabbyAPI using that port?")
            return True
        if status in (401, 403):
            raise BackendFailed(f"{model.name}: TabbyAPI on port {port} refused the proxy's probe ({status})")
        return False

    return LaunchPlan(
        argv=(tabby_python(config, tabby_dir), "main.py", "--config", str(config_path)),
        port=port,
        probe=probe,
        cwd=tabby_dir,
        files={config_path: yaml.safe_dump(generated, sort_keys=False)},
        headers=headers,
    )


# What TabbyAPI's load request (POST /v1/model/load, ModelLoadRequest) carries of the `model:` and
# `draft_model:` sections. Everything else a load takes from the process's own config, and only for
# the keys listed in `model.use_as_default`.
LOAD_KEYS = ("max_seq_len", "cache_size", "cache_mode", "tensor_parallel", "tensor_parallel_backend",
             "gpu_split_auto", "autosplit_reserve", "gpu_split", "rope_scale", "rope_alpha", "chunk_size",
             "output_chunking", "prompt_template", "vision", "backend")
DRAFT_LOAD_KEYS = ("draft_model_name", "draft_rope_scale", "draft_rope_alpha", "draft_gpu_split")
_FORCED_MODEL_KEYS = ("model_dir", "model_name", "inline_model_loading", "use_as_default")


def tabby_config(model: ModelConfig, port: int, *, auth: bool = False) -> dict[str, Any]:
    """Return the TabbyAPI config for one launch: config.yml and the profile, with our keys forced.

    Loopback only, on the port we chose, OpenAI routes only (Kobold's /api/* would shadow Ollama's).
    With auth off (the default) only local processes can reach it; clients authenticate to the proxy.
    A process shared by a resident group also lists, in `model.use_as_default`, every model and draft
    setting a load request cannot carry, so that an in-place load keeps them (TabbyAPI's loads
    otherwise fall back to its defaults for those, e.g. max_batch_size).
    """
    sections: Mapping[str, Any] = model.tabby
    model_section = sections.get("model", {})
    model_dir = model_section.get("model_dir") or "models"  # relative to the TabbyAPI folder
    forced: dict[str, Any] = {
        "network": {"host": "127.0.0.1", "port": port, "disable_auth": not auth, "api_servers": ["OAI"]},
        "model": {"model_dir": model_dir, "model_name": model.upstream_model, "inline_model_loading": False},
    }
    forced["model"].update(placed_split(model))
    if model.resident_group:
        kept = [*(model_section.get("use_as_default") or [])]
        kept += [key for key in model_section if key not in LOAD_KEYS and key not in _FORCED_MODEL_KEYS]
        kept += [key for key in sections.get("draft_model", {}) if key not in DRAFT_LOAD_KEYS]
        if kept:
            forced["model"]["use_as_default"] = list(dict.fromkeys(kept))
    return deep_merge(sections, forced)


def load_request(model: ModelConfig) -> dict[str, Any]:
    """Return the body of TabbyAPI's POST /v1/model/load for `model`: what a load can carry."""
    model_section = model.tabby.get("model", {})
    body: dict[str, Any] = {"model_name": model.upstream_model}
    body.update({key: model_section[key] for key in LOAD_KEYS if key in model_section})
    body.update(placed_split(model))
    draft = model.tabby.get("draft_model", {})
    if draft.get("draft_model_name"):
        body["draft_model"] = {key: draft[key] for key in DRAFT_LOAD_KEYS if key in draft}
    return body


def placed_split(model: ModelConfig) -> dict[str, Any]:
    """Return the `model:` keys that give TabbyAPI a placed model's declared split (`footprint.vram` as a list),
    in GB per visible GPU, unless the profile sets its own `gpu_split`; empty otherwise (TabbyAPI autosplits)."""
    split = model.footprint.split if model.footprint is not None else None
    if not model.devices or not split or model.tabby.get("model", {}).get("gpu_split"):
        return {}
    return {"gpu_split_auto": False, "gpu_split": [round(size / 1024 ** 3, 2) for size in split]}


def process_settings(model: ModelConfig) -> dict[str, str]:
    """Return the settings of a TabbyAPI process for `model` that an in-place load cannot change.

    Flattened to dotted key paths (values as JSON-ish text) so two profiles can be compared: an
    in-place load of B into a process started for A gives B's model only if these are equal.
    """
    generated = tabby_config(model, 0)
    carried = {("model", key) for key in (*LOAD_KEYS, "model_name")}
    carried |= {("draft_model", key) for key in DRAFT_LOAD_KEYS}
    flat: dict[str, str] = {}
    for section, values in generated.items():
        if not isinstance(values, Mapping):
            flat[section] = repr(values)
            continue
        for key, value in values.items():
            if (section, key) not in carried:
                flat[f"{section}.{key}"] = repr(value)
    if model.devices is not None:  # the process sees only these GPUs
        flat["env.CUDA_VISIBLE_DEVICES"] = visible_devices(model)
    return flat


def tabby_python(config: Config, tabby_dir: Path) -> str:
    """Return the interpreter for TabbyAPI: proxy.tabby_python, its venv, or the proxy's own."""
    if config.proxy.tabby_python:
        return config.proxy.tabby_python
    for candidate in (tabby_dir / "venv" / "bin" / "python", tabby_dir / ".venv" / "bin" / "python"):
        if candidate.is_file():
            return str(candidate)
    return sys.executable


def backend_keys(model: ModelConfig, tabby_dir: Path) -> dict[str, Any]:
    """Return TabbyAPI's own keys (its folder's api_tokens.yml), creating the file as TabbyAPI would."""
    path = tabby_dir / "api_tokens.yml"
    if not path.exists():
        create_tokens_file(path)
    try:
        keys = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BackendFailed(f"{model.name}: cannot read TabbyAPI's keys in {path}: {exc}") from None
    if not isinstance(keys, dict) or not isinstance(keys.get("admin_key"), str):
        raise BackendFailed(f"{model.name}: {path} has no admin_key; the proxy needs it (proxy.tabby_auth: keys)")
    return keys


def admin_headers(keys: Mapping[str, Any]) -> dict[str, str]:
    """Return the headers that authenticate the proxy to TabbyAPI on every route (the admin key)."""
    return {"x-admin-key": keys["admin_key"], "Authorization": f"Bearer {keys['admin_key']}"}
