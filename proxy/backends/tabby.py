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

from proxy.backends import LaunchPlan, http_get
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


def tabby_config(model: ModelConfig, port: int, *, auth: bool = False) -> dict[str, Any]:
    """Return the TabbyAPI config for one launch: config.yml and the profile, with our keys forced.

    Loopback only, on the port we chose, OpenAI routes only (Kobold's /api/* would shadow Ollama's).
    With auth off (the default) only local processes can reach it; clients authenticate to the proxy.
    """
    sections: Mapping[str, Any] = model.tabby
    model_dir = sections.get("model", {}).get("model_dir") or "models"  # relative to the TabbyAPI folder
    forced = {
        "network": {"host": "127.0.0.1", "port": port, "disable_auth": not auth, "api_servers": ["OAI"]},
        "model": {"model_dir": model_dir, "model_name": model.upstream_model, "inline_model_loading": False},
    }
    return deep_merge(sections, forced)


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
