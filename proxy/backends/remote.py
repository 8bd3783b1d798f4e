"""The `remote` launcher starts nothing: a server on another machine (a `remote` profile, or a peer
proxy's model) is ready once its /v1/models answers with the proxy's key and lists the model. A
request that fails there makes it look again; gone, it reports so through its exit callback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import requests

from proxy.backends import served_model_ids
from proxy.config import ModelConfig
from proxy.errors import BackendFailed, BackendTimeout
from proxy.profiles import RemoteSettings

ExitCallback = Callable[[Any, int], None]  # the launcher's: (backend, returncode)

LOADING_POLL_S = 1.0  # while a remote server answers 503 (loading its model)


class RemoteBackend:
    """A model served by a server the proxy did not start: no process, no port of ours, nothing to stop."""

    def __init__(self, model: ModelConfig, on_exit: ExitCallback) -> None:
        assert model.remote is not None, "a remote backend needs remote settings"
        self._model = model
        self._settings: RemoteSettings = model.remote
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._lost: str | None = None  # guarded by _lock: why it was reported gone
        self._stopped = False          # guarded by _lock

    @property
    def pid(self) -> int | None:
        return None

    @property
    def port(self) -> int | None:
        return None

    @property
    def base_url(self) -> str:
        return self._settings.endpoint.url

    @property
    def headers(self) -> Mapping[str, str]:
        return self._settings.endpoint.headers

    @property
    def progress(self) -> str | None:
        return None

    @property
    def where(self) -> str:
        """Name the server in messages: its URL, never its credentials."""
        peer = self._settings.peer
        return f"peer {peer} at {self.base_url}" if peer else f"the remote server at {self.base_url}"

    def wait_ready(self, probe: Any = None, timeout_s: float = 600.0) -> float:
        """Check the server's /v1/models; return the seconds it took.

        Raises BackendFailed at once when it is unreachable, refuses the key or does not serve the
        model; while it answers 503 (loading) it is asked again every second, up to timeout_s
        (then BackendTimeout).
        """
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            verdict, reason = self.look()
            if verdict == "ready":
                return time.monotonic() - started
            if verdict == "failed":
                raise BackendFailed(f"{self._model.name}: {reason}")
            with self._lock:
                stopped = self._stopped
            if stopped:
                raise BackendFailed(f"{self._model.name}: unloaded while {self.where} was loading it")
            if time.monotonic() >= deadline:
                raise BackendTimeout(f"{self._model.name}: {reason}, and was not ready within {timeout_s:g}s "
                                     "(startup_timeout)")
            time.sleep(min(LOADING_POLL_S, max(0.0, deadline - time.monotonic())))

    def look(self) -> tuple[str, str]:
        """GET /v1/models once; return ("ready", ""), ("loading", why) or ("failed", why)."""
        settings = self._settings
        try:
            with requests.Session() as http:
                http.trust_env = False  # as the upstream client: never through an HTTP(S)_PROXY
                response = http.get(self.base_url + "/v1/models", headers=dict(settings.endpoint.headers),
                                    timeout=settings.timeout_s, allow_redirects=False)
                status = response.status_code
                try:
                    listing = response.json() if status == 200 else None
                except ValueError:
                    listing = None
        except requests.Timeout:
            return "failed", f"{self.where} is unreachable: no answer within {settings.timeout_s:g}s"
        except requests.RequestException as exc:
            return "failed", f"{self.where} is unreachable: {connection_reason(exc)}"
        if status in (401, 403):
            return "failed", f"{self.where} refused the proxy's key (HTTP {status})"
        if status == 503:
            return "loading", f"{self.where} answers 503 (loading)"
        if status != 200:
            return "failed", f"{self.where} answered HTTP {status} to GET /v1/models"
        if listing is None:
            return "failed", f"{self.where} answered GET /v1/models with something that is not JSON"
        expected = settings.model_id
        if expected is not None:
            served = served_model_ids(listing)
            if expected not in served:
                shown = ", ".join(sorted(served)[:20]) or "nothing"
                return "failed", f"{self.where} does not serve {expected!r} (it lists {shown})"
        return "ready", ""

    def check_alive(self) -> None:
        """A request failed there: look again, and if the server is gone report it (once) to the manager.

        Blocks for at most remote.timeout; the next request then finds the model stopped and checks anew.
        """
        with self._lock:
            if self._lost is not None or self._stopped:
                return
        verdict, reason = self.look()
        if verdict == "ready":
            return
        with self._lock:
            if self._lost is not None or self._stopped:
                return
            self._lost = reason
        self._on_exit(self, -1)

    def exit_reason(self, returncode: int) -> str:
        return f"{self._lost or f'{self.where} stopped answering'}; the next request checks it again"

    def stop(self, grace_s: float, successor: ModelConfig | None = None) -> int | None:
        """Forget the server (nothing runs here to stop)."""
        with self._lock:
            self._stopped = True
        return None

    def tail(self, lines: int = 20) -> str:
        return ""  # no output of ours: the messages say what the server answered


def connection_reason(exc: BaseException) -> str:
    """Return why a connection failed, briefly ("connection refused"), from a requests error's causes."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        error = pending.pop(0)
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.strerror:
            return error.strerror[:1].lower() + error.strerror[1:]
        pending += [arg for arg in error.args if isinstance(arg, BaseException)]
        pending += [cause for cause in (error.__cause__, error.__context__, getattr(error, "reason", None))
                    if isinstance(cause, BaseException)]
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."
