"""Launching a model's backend: what the manager needs of one (Launch, Backend) and the real launcher.

ProcessLauncher takes a port from the pool, the backend's plan and a supervised child; profiles
with a `resident_group` go through Residents, and remote ones (`remote`, peers' models) start
nothing (backends/remote.py). The manager decides when; this module only starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from proxy.backends import plan_launch, visible_devices
from proxy.backends.remote import RemoteBackend
from proxy.config import Config, ModelConfig
from proxy.nvml import Gpus
from proxy.resident import Residents
from proxy.sessions import ChildRegistry
from proxy.supervisor import BackendProcess, PortPool, spawn

ExitCallback = Callable[[Any, int], None]


class Backend(Protocol):
    """What the manager needs of a running backend (supervisor.BackendProcess, a RemoteBackend, or a test fake)."""

    @property
    def pid(self) -> int | None: ...   # None: nothing runs here (a remote server)
    @property
    def port(self) -> int | None: ...
    @property
    def base_url(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def progress(self) -> str | None: ...
    def wait_ready(self, probe: Any = None, timeout_s: float = ...) -> float: ...
    def stop(self, grace_s: float, successor: ModelConfig | None = None) -> int | None: ...
    def tail(self, lines: int = ...) -> str: ...
    def check_alive(self) -> None:
        """A request to it failed: look whether it is still there, and report it gone through the exit
        callback if not (a process's exit is watched already, so processes need do nothing)."""
    def exit_reason(self, returncode: int) -> str:
        """Say how it ended on its own, for /status and the log: "the backend exited unexpectedly (...)"."""


Launch = Callable[[ModelConfig, ExitCallback], Backend]
"""Spawn a model's backend and return at once; the manager then calls wait_ready()."""


class ProcessLauncher:
    """The real Launch: a port from the pool, the backend's plan, a supervised child.

    Once it follows the manager's config (follow()), a reload reaches it in the manager's one step;
    the port pool stays (a new port range needs a restart). Profiles with a `resident_group` go
    through Residents (TabbyAPI's in-place swap).
    """

    def __init__(self, config: Config, registry: ChildRegistry | None = None, gpus: Gpus | None = None) -> None:
        self._config: Callable[[], Config] = lambda: config
        self._ports = PortPool(*config.proxy.backend_ports)
        self._registry = registry
        self._residents = Residents(self._spawn_process, gpus=gpus)  # NVML: whether in-place unloads free VRAM

    @property
    def config(self) -> Config:
        return self._config()

    def follow(self, source: Callable[[], Config]) -> None:
        """Read the config from `source` from now on (the manager's, which a reload replaces)."""
        self._config = source

    def __call__(self, model: ModelConfig, on_exit: ExitCallback) -> Backend:
        if model.remote is not None:
            return RemoteBackend(model, on_exit)
        if model.backend == "tabbyapi" and model.resident_group:
            return self._residents.launch(model, on_exit)
        return self._spawn_process(model, on_exit)

    def _spawn_process(self, model: ModelConfig, on_exit: ExitCallback) -> BackendProcess:
        config = self.config
        port = self._ports.reserve()

        def exited(process: BackendProcess, returncode: int) -> None:
            self._ports.release(port)
            on_exit(process, returncode)

        try:
            plan = plan_launch(model, config, port)
            if model.devices is not None:  # the GPUs the scheduler placed it on, numbered as NVML does (PCI order)
                plan = dataclasses.replace(plan, env={**plan.env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                                                      "CUDA_VISIBLE_DEVICES": visible_devices(model)})
            return spawn(model.name, plan, log_dir=config.proxy.state_dir / "logs", on_exit=exited,
                         registry=self._registry)
        except BaseException:
            self._ports.release(port)
            raise

    def close(self) -> None:
        """Stop what only the launcher knows of: resident processes with no model loaded."""
        self._residents.close(self.config.proxy.stop_grace_s)
