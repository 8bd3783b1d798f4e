"""Resident TabbyAPI processes: the fast swap mode.

Profiles with the same `resident_group` share one TabbyAPI process. A swap between two of them
unloads and loads the model over TabbyAPI's admin API (POST /v1/model/unload, /v1/model/load)
instead of restarting the process, which skips the interpreter, torch and CUDA start-up. Any
other stop kills the process, the only sure way to give all VRAM back; a failed in-place load
falls back to a fresh process. An in-place load serves exactly what a fresh process would: a
member whose settings differ in anything a load request cannot carry gets a fresh process.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from proxy.backends import http_get
from proxy.backends.tabby import load_request, process_settings
from proxy.config import ModelConfig
from proxy.errors import BackendFailed, BackendTimeout, ProxyError
from proxy.memory import format_size
from proxy.nvml import Gpus
from proxy.supervisor import BackendProcess

log = logging.getLogger(__name__)

ExitCallback = Callable[[Any, int], None]
SpawnProcess = Callable[[ModelConfig, ExitCallback], BackendProcess]

EMPTY_LINGER_S = 30.0  # a resident process with no model is kept this long for the next load
EMPTY_PROCESS_BYTES = 1024 ** 3  # VRAM an emptied TabbyAPI may keep (CUDA context, torch's allocator)
RETURN_WAIT_S = 5.0    # how long an in-place unload may take to give its VRAM back (NVML)
RETURN_POLL_S = 0.25
SERVED_POLL_S = 0.02   # after a load's last event, how often to ask whether the model is served yet


class ResidentGroup:
    """One shared process and the member loaded in it. Fields are guarded by `lock`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.process: BackendProcess | None = None
        self.loaded: str | None = None               # the profile loaded in the process now
        self.settings: dict[str, str] = {}           # what the process runs with that a load cannot change
        self.on_exit: ExitCallback | None = None     # the loaded member's, told when the process dies
        self.generation = 0                          # bumped when the process changes or a load starts

    def differences(self, model: ModelConfig) -> list[str]:
        """Return the settings (dotted keys) in which `model` differs from what the process runs with,
        beyond what a load request carries; empty when an in-place load gives what a fresh process would."""
        wanted = process_settings(model)
        return sorted(key for key in wanted.keys() | self.settings.keys() if wanted.get(key) != self.settings.get(key))

    def exited(self, process: BackendProcess, returncode: int) -> None:
        with self.lock:
            callback = self.on_exit if process is self.process else None
            if process is self.process:
                self.process, self.loaded, self.on_exit = None, None, None
        if callback is not None:
            callback(process, returncode)


class Residents:
    """The resident groups of one launcher; hands out members for the manager to start and stop."""

    def __init__(self, spawn_process: SpawnProcess, linger_s: float = EMPTY_LINGER_S, gpus: Gpus | None = None) -> None:
        self._spawn = spawn_process
        self._linger_s = linger_s
        self._gpus = gpus
        self._groups: dict[str, ResidentGroup] = {}
        self._lock = threading.Lock()

    def launch(self, model: ModelConfig, on_exit: ExitCallback) -> ResidentMember:
        """Return a member for `model`: loaded in place into an idle resident process, or a new process.

        An idle resident process started with settings that a load request cannot change (anything
        but the model and its load parameters) is replaced, so that an in-place load always serves
        what a fresh process for `model` would.
        """
        assert model.resident_group is not None
        with self._lock:
            group = self._groups.setdefault(model.resident_group, ResidentGroup(model.resident_group))
        stale: BackendProcess | None = None
        with group.lock:
            process = group.process
            if process is not None and process.is_alive() and group.loaded is not None:
                # The resident process holds another model (several may be loaded at once):
                # this one gets a process of its own, as without the fast mode.
                return ResidentMember(self, None, model, self._spawn(model, on_exit), on_exit, in_place=False)
            if process is not None and process.is_alive():
                differing = group.differences(model)
                if not differing:
                    group.loaded, group.on_exit = model.name, on_exit
                    group.generation += 1
                    return ResidentMember(self, group, model, process, on_exit, in_place=True)
                group.process, stale = None, process
        if stale is not None:
            log.info("model %s: restarting resident group %s (pid %d) instead of loading in place: "
                     "TabbyAPI's load request cannot change %s", model.name, group.name, stale.pid,
                     ", ".join(differing))
            stale.stop(10.0)
        return ResidentMember(self, group, model, self.respawn(group, model, on_exit), on_exit, in_place=False)

    def respawn(self, group: ResidentGroup, model: ModelConfig, on_exit: ExitCallback) -> BackendProcess:
        """Start a new resident process for the group with `model` loaded at start-up."""
        process = self._spawn(model, group.exited)
        with group.lock:
            group.process, group.loaded, group.on_exit = process, model.name, on_exit
            group.settings = process_settings(model)
            group.generation += 1
        return process

    def linger(self, group: ResidentGroup, grace_s: float) -> None:
        """Kill the group's process if it is still empty after a while (a swap that never came)."""
        with group.lock:
            generation = group.generation

        def reap() -> None:
            with group.lock:
                process = group.process if group.generation == generation and group.loaded is None else None
                if process is not None:
                    group.process = None
            if process is not None:
                log.info("resident group %s: no model loaded for %gs; stopping pid %d", group.name,
                         self._linger_s, process.pid)
                process.stop(grace_s)

        timer = threading.Timer(self._linger_s, reap)
        timer.daemon = True
        timer.start()

    def vram(self, pid: int) -> int | None:
        """Return the VRAM a resident process (and its children) holds now; None without NVML."""
        return None if self._gpus is None else sum(self._gpus.group_usage(pid).values())

    def gave_memory_back(self, model: ModelConfig, pid: int, before: int | None) -> bool:
        """After an in-place unload: wait (bounded) until NVML shows the process's VRAM back; say whether it did.

        TabbyAPI has leaked VRAM on in-place unloads before; a process that keeps it is restarted instead.
        """
        if before is None or before <= EMPTY_PROCESS_BYTES:
            return True
        deadline = time.monotonic() + RETURN_WAIT_S
        while (now := self.vram(pid) or 0) > max(EMPTY_PROCESS_BYTES, before // 10):
            if time.monotonic() >= deadline:
                log.warning("model %s: pid %d still holds %s of VRAM %gs after unloading in place (%s before); "
                            "restarting the process to free it", model.name, pid, format_size(now), RETURN_WAIT_S,
                            format_size(before))
                return False
            time.sleep(RETURN_POLL_S)
        return True

    def close(self, grace_s: float) -> None:
        """Stop every resident process (proxy shutdown)."""
        with self._lock:
            groups = list(self._groups.values())
        for group in groups:
            with group.lock:
                process, group.process, group.loaded = group.process, None, None
            if process is not None:
                process.stop(grace_s)


class ResidentMember:
    """A Backend for the manager: one profile inside a (possibly shared) TabbyAPI process."""

    def __init__(self, residents: Residents, group: ResidentGroup | None, model: ModelConfig,
                 process: BackendProcess, on_exit: ExitCallback, *, in_place: bool) -> None:
        self._residents = residents
        self._group = group
        self._model = model
        self._process = process
        self._on_exit = on_exit
        self._in_place = in_place
        self.progress: str | None = None

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def port(self) -> int:
        return self._process.port

    @property
    def base_url(self) -> str:
        return self._process.base_url

    @property
    def headers(self) -> Mapping[str, str]:
        return self._process.headers

    def tail(self, lines: int = 20) -> str:
        return self._process.tail(lines)

    def check_alive(self) -> None:
        self._process.check_alive()

    def exit_reason(self, returncode: int) -> str:
        return self._process.exit_reason(returncode)

    def wait_ready(self, probe: Any = None, timeout_s: float = 600.0) -> float:
        """Load in place over the admin API, or wait for a new process; fall back to a new process."""
        if not self._in_place:
            return self._process.wait_ready(probe, timeout_s)
        started = time.monotonic()
        try:
            self._load_in_place(started + timeout_s)
            return time.monotonic() - started
        except ProxyError as exc:
            log.warning("model %s: in-place load failed (%s); starting a fresh process", self._model.name, exc.message)
        assert self._group is not None
        with self._group.lock:
            stale = self._group.process if self._group.process is self._process else None
            if stale is not None:
                self._group.process, self._group.loaded, self._group.on_exit = None, None, None
        if stale is not None:
            stale.stop(10.0)
        self._in_place = False
        self._process = self._residents.respawn(self._group, self._model, self._on_exit)
        self.progress = None
        return self._process.wait_ready(None, max(1.0, timeout_s - (time.monotonic() - started)))

    def stop(self, grace_s: float, successor: ModelConfig | None = None) -> int | None:
        """Unload in place when a member of the same group comes next; otherwise stop the process."""
        group = self._group
        keep = (group is not None and successor is not None and successor.resident_group == group.name
                and group.process is self._process and self._process.is_alive())
        if keep and group is not None and successor is not None and (differing := group.differences(successor)):
            log.info("model %s: restarting resident group %s (pid %d) for %s instead of loading in place: "
                     "TabbyAPI's load request cannot change %s", self._model.name, group.name, self.pid,
                     successor.name, ", ".join(differing))
            keep = False
        if keep and group is not None:
            try:
                before = self._residents.vram(self.pid)
                self._admin_post("/v1/model/unload", None, timeout_s=60)
                if not self._residents.gave_memory_back(self._model, self.pid, before):
                    raise BackendFailed(f"{self._model.name}: the in-place unload did not give the VRAM back")
                with group.lock:
                    group.loaded, group.on_exit = None, None
                    group.generation += 1
                self._residents.linger(group, grace_s)
                log.info("model %s: unloaded in place (pid %d stays for %s)", self._model.name, self.pid, successor.name
                         if successor else "")
                return 0
            except ProxyError as exc:
                log.warning("model %s: in-place unload failed (%s); stopping the process", self._model.name, exc.message)
        if group is not None:
            with group.lock:
                if group.process is self._process:
                    group.process, group.loaded, group.on_exit = None, None, None
        return self._process.stop(grace_s)

    def _load_in_place(self, deadline: float) -> None:
        """Load the model over the admin API and wait until TabbyAPI serves it (monotonic deadline).

        TabbyAPI sends its last `finished` event before it has installed the new model: for a
        moment GET /v1/model still answers 503 "No models are currently loaded", so the load is
        done only when the model is served.
        """
        for event in self._admin_stream("/v1/model/load", load_request(self._model), deadline - time.monotonic()):
            if "error" in event:
                error = event["error"]
                raise BackendFailed(f"{self._model.name}: TabbyAPI could not load it: "
                                    f"{error.get('message') if isinstance(error, dict) else error}")
        expected = self._model.upstream_model
        while True:
            answer = http_get(self.port, "/v1/model", self.headers)
            status, card = answer if answer is not None else (None, None)
            served = card.get("id") if status == 200 and isinstance(card, dict) else None
            if served == expected:
                break
            if served is not None or status not in (None, 503) or not self._process.is_alive():
                raise BackendFailed(f"{self._model.name}: after loading, TabbyAPI serves {served!r} "
                                    f"(GET /v1/model answered {status})")
            if time.monotonic() >= deadline:
                raise BackendTimeout(f"{self._model.name}: TabbyAPI finished loading but did not serve the "
                                     "model before the start-up timeout")
            time.sleep(SERVED_POLL_S)
        self.progress = None

    def _admin_stream(self, path: str, body: Any, timeout_s: float) -> list[dict[str, Any]]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            connection.request("POST", path, body=json.dumps(body),
                               headers={"Content-Type": "application/json", **self.headers})
            response = connection.getresponse()
            if response.status != 200:
                raise BackendFailed(f"{self._model.name}: TabbyAPI answered {response.status} to {path}: "
                                    f"{response.read()[:300].decode('utf-8', 'replace')}")
            events = []
            for raw in response:  # SSE lines, read as they arrive
                line = raw.strip()
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload and payload != b"[DONE]":
                        event = json.loads(payload)
                        if isinstance(event, dict):
                            events.append(event)
                            self.progress = f"loading {event.get('module')}/{event.get('modules')}"
                            if "error" in event or (event.get("status") == "finished"
                                                    and event.get("model_type", "model") == "model"):
                                break
            return events
        except TimeoutError as exc:
            raise BackendTimeout(f"{self._model.name}: TabbyAPI did not answer {path} within {timeout_s:g}s") from exc
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise BackendFailed(f"{self._model.name}: {path} failed: {exc}") from exc
        finally:
            connection.close()

    def _admin_post(self, path: str, body: Any, timeout_s: float) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            connection.request("POST", path, body=json.dumps(body),
                               headers={"Content-Type": "application/json", **self.headers})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise BackendFailed(f"{self._model.name}: TabbyAPI answered {response.status} to {path}")
        except (OSError, http.client.HTTPException) as exc:
            raise BackendFailed(f"{self._model.name}: {path} failed: {exc}") from exc
        finally:
            connection.close()
