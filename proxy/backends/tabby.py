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
from proxy.errors import BackendFailed


def plan(model: ModelConfig, config: Config, port: int) -> LaunchPlan:
    tabby_dir = config.proxy.tabby_dir
    if tabby_dir is None or not (tabby_dir / "main.py").is_file():
        raise BackendFailed(
            f"{model.name}: TabbyAPI not found: set proxy.tabby_dir in {config.path.name} to a TabbyAPI "
            f"checkout (the folder with main.py); now {str(tabby_dir) if tabby_dir else 'unset'}"
        )
    generated = tabby_config(model, port)
    config_path = config.proxy.state_dir / "tabby" / f"{model.name}.yml"
    expected = model.upstream_model

    def probe() -> bool:
        # TabbyAPI loads its start-up model before binding, so "refused" means "still loading".
        answer = http_get(port, "/v1/model")
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
    )


def tabby_config(model: ModelConfig, port: int) -> dict[str, Any]:
    """Return the TabbyAPI config for one launch: config.yml and the profile, with our keys forced."""
    sections: Mapping[str, Any] = model.tabby
    model_dir = sections.get("model", {}).get("model_dir") or "models"  # relative to the TabbyAPI folder
    forced = {
        # Loopback only, on the port we chose. Auth is off because only the proxy can reach it;
        # clients authenticate to the proxy.
        "network": {"host": "127.0.0.1", "port": port, "disable_auth": True, "api_servers": ["OAI"]},
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
