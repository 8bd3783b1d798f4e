"""Resident TabbyAPI processes: the fast swap mode.

Profiles with the same `resident_group` share one TabbyAPI process. A swap between two of them
unloads and loads the model over TabbyAPI's admin API (POST /v1/model/unload, /v1/model/load)
instead of restarting the process, which skips the interpreter, torch and CUDA start-up. Any
other stop kills the process, the only sure way to give all VRAM back; a failed in-place load
falls back to a fresh process.
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
from proxy.config import ModelConfig
from proxy.errors import BackendFailed, BackendTimeout, ProxyError
from proxy.supervisor import BackendProcess

log = logging.getLogger(__name__)

ExitCallback = Callable[[Any, int], None]
SpawnProcess = Callable[[ModelConfig, ExitCallback], BackendProcess]

EMPTY_LINGER_S = 30.0  # a resident process with no model is kept this long for the next load
# Keys of a profile's `model:` section that TabbyAPI's load request accepts (ModelLoadRequest).
LOAD_KEYS = ("max_seq_len", "cache_size", "cache_mode", "tensor_parallel", "tensor_parallel_backend",
             "gpu_split_auto", "autosplit_reserve", "gpu_split", "rope_scale", "rope_alpha", "chunk_size",
             "output_chunking", "prompt_template", "vision", "backend")
DRAFT_KEYS = ("draft_model_name", "draft_rope_scale", "draft_rope_alpha", "draft_gpu_split")


class ResidentGroup:
    """One shared process and the member loaded in it. Fields are guarded by `lock`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.process: BackendProcess | None = None
        self.loaded: str | None = None               # the profile loaded in the process now
        self.on_exit: ExitCallback | None = None     # the loaded member's, told when the process dies
        self.generation = 0                          # bumped when the process changes or a load starts

    def exited(self, process: BackendProcess, returncode: int) -> None:
        with self.lock:
            callback = self.on_exit if process is self.process else None
            if process is self.process:
                self.process, self.loaded, self.on_exit = None, None, None
        if callback is not None:
            callback(process, returncode)


class Residents:
    """The resident groups of one launcher; hands out members for the manager to start and stop."""

    def __init__(self, spawn_process: SpawnProcess, linger_s: float = EMPTY_LINGER_S) -> None:
        self._spawn = spawn_process
        self._linger_s = linger_s
        self._groups: dict[str, ResidentGroup] = {}
        self._lock = threading.Lock()

    def launch(self, model: ModelConfig, on_exit: ExitCallback) -> ResidentMember:
        """Return a member for `model`: loaded in place into an idle resident process, or a new process."""
        assert model.resident_group is not None
        with self._lock:
            group = self._groups.setdefault(model.resident_group, ResidentGroup(model.resident_group))
        with group.lock:
            process = group.process
            if process is not None and process.is_alive() and group.loaded is None:
                group.loaded, group.on_exit = model.name, on_exit
                group.generation += 1
                return ResidentMember(self, group, model, process, on_exit, in_place=True)
            if process is not None and process.is_alive():
                # The resident process holds another model (several may be loaded at once):
                # this one gets a process of its own, as without the fast mode.
                return ResidentMember(self, None, model, self._spawn(model, on_exit), on_exit, in_place=False)
        return self._new_resident(group, model, on_exit)

    def _new_resident(self, group: ResidentGroup, model: ModelConfig, on_exit: ExitCallback) -> ResidentMember:
        process = self._spawn(model, group.exited)
        with group.lock:
            group.process, group.loaded, group.on_exit = process, model.name, on_exit
            group.generation += 1
        return ResidentMember(self, group, model, process, on_exit, in_place=False)

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

    def wait_ready(self, probe: Any = None, timeout_s: float = 600.0) -> float:
        """Load in place over the admin API, or wait for a new process; fall back to a new process."""
        if not self._in_place:
            return self._process.wait_ready(probe, timeout_s)
        started = time.monotonic()
        try:
            self._load_in_place(timeout_s)
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
        fresh = self._residents._new_resident(self._group, self._model, self._on_exit)
        self._process = fresh._process
        self.progress = None
        return self._process.wait_ready(None, max(1.0, timeout_s - (time.monotonic() - started)))

    def stop(self, grace_s: float, successor: ModelConfig | None = None) -> int | None:
        """Unload in place when a member of the same group comes next; otherwise stop the process."""
        group = self._group
        keep = (group is not None and successor is not None and successor.resident_group == group.name
                and group.process is self._process and self._process.is_alive())
        if keep and group is not None:
            try:
                self._admin_post("/v1/model/unload", None, timeout_s=60)
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

    def _load_in_place(self, timeout_s: float) -> None:
        model_section = self._model.tabby.get("model", {})
        body: dict[str, Any] = {"model_name": self._model.upstream_model}
        body.update({key: model_section[key] for key in LOAD_KEYS if key in model_section})
        draft = self._model.tabby.get("draft_model", {})
        if draft.get("draft_model_name"):
            body["draft_model"] = {key: draft[key] for key in DRAFT_KEYS if key in draft}
        for event in self._admin_stream("/v1/model/load", body, timeout_s):
            if "error" in event:
                error = event["error"]
                raise BackendFailed(f"{self._model.name}: TabbyAPI could not load it: "
                                    f"{error.get('message') if isinstance(error, dict) else error}")
        answer = http_get(self.port, "/v1/model", self.headers)
        served = answer[1].get("id") if answer and answer[0] == 200 and isinstance(answer[1], dict) else None
        if served != self._model.upstream_model:
            raise BackendFailed(f"{self._model.name}: after loading, TabbyAPI serves {served!r}")
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
