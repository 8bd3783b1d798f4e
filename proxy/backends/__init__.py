"""Launchers: turn a profile into a command line, an environment, generated files and a readiness probe.

One module per backend kind. Launchers never spawn, wait or keep state; the supervisor does that.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from proxy.config import Config, ModelConfig

Probe = Callable[[], bool]
"""Return True once the backend serves the expected model, False while it is still loading.

Raises BackendFailed when the port is answered by a server that is not ours."""

PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    argv: tuple[str, ...]
    port: int
    probe: Probe
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    cwd: Path | None = None
    files: Mapping[Path, str] = field(default_factory=lambda: MappingProxyType({}))
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    stop_argv: tuple[str, ...] | None = None  # run to stop it (a container's `docker stop`), before any signal

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def plan_launch(model: ModelConfig, config: Config, port: int) -> LaunchPlan:
    """Return how to start `model` on `port`; raises BackendFailed when it cannot be started."""
    from proxy.backends import command, llamacpp, tabby

    planners = {"tabbyapi": tabby.plan, "llamacpp": llamacpp.plan, "command": command.plan}
    return planners[model.backend](model, config, port)


def visible_devices(model: ModelConfig) -> str:
    """Return CUDA_VISIBLE_DEVICES for a model the scheduler placed (its `devices`), e.g. "0,1"."""
    return ",".join(str(index) for index in model.devices or ())


def http_get(port: int, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, Any] | None:
    """GET a loopback URL; return (status, parsed JSON or None), or None when nothing answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT_S)
    try:
        connection.request("GET", path, headers=dict(headers or {}))
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    return response.status, parsed


def served_model_ids(listing: Any) -> set[str]:
    """Return the model ids (and llama.cpp aliases) in a /v1/models answer."""
    ids: set[str] = set()
    if isinstance(listing, dict):
        for card in listing.get("data") or []:
            if isinstance(card, dict):
                ids.add(str(card.get("id")))
                ids.update(str(alias) for alias in card.get("aliases") or [])
    return ids
