"""What the operator's view listens to: one `RequestRecord` per finished request and the manager's
model events, fanned out by `Observers` to metrics, the request log and the dashboard's recent
history. Observers never decide anything, and one that fails never fails a request.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from proxy.records import ModelEvent

log = logging.getLogger(__name__)

RECENT_LIMIT = 5000      # requests the dashboard's history keeps in memory
RECENT_WINDOW_S = 3600.0  # and for at most this long


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request as the operator sees it. Never a prompt, an answer or a raw key."""

    time: float                    # wall clock (epoch seconds) when it arrived
    key: str | None                # the key's name (`api_key`, a named key, `(loopback)`); None with auth off
    client: str                    # the client's address
    route: str                     # the route's pattern (`/v1/chat/completions`), bounded; `-` for none
    dialect: str                   # openai, ollama, anthropic, responses, llamacpp, admin, other
    model: str | None              # the profile it used
    status: int
    error: str | None              # the error code (`model_busy`, `backend_failed`, ...), also for in-band errors
    waited_s: float | None         # waited for the model: queue, swap, load (None: no model was needed)
    ttft_s: float | None           # to the first byte of the answer's body after the model was granted
    duration_s: float              # arrival to the last byte sent
    prompt_tokens: int | None      # from the backend's usage, when it reported one
    completion_tokens: int | None
    bytes_in: int
    bytes_out: int
    stream: bool
    loaded: bool                   # the request started (or waited for) a load of its model

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def tokens_per_s(self) -> float | None:
        """Generation speed: completion tokens over the time from the first byte to the last."""
        if not self.completion_tokens or self.ttft_s is None or self.waited_s is None:
            return None
        generating = self.duration_s - self.waited_s - self.ttft_s
        return self.completion_tokens / generating if generating > 0 else None


class Observer(Protocol):
    """What the operator's view implements. Both calls must return quickly: model_event runs under the
    manager's lock (hand the event on, never call the manager), request_done on the request's thread."""

    def model_event(self, event: ModelEvent) -> None: ...
    def request_done(self, record: RequestRecord) -> None: ...
    def rejected(self, reason: str) -> None: ...


class Observers:
    """Every observer, called in turn; an exception is logged (once per observer and kind) and dropped."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self._observers = list(observers)
        self._failed: set[tuple[int, str]] = set()

    def add(self, observer: Observer) -> None:
        self._observers.append(observer)

    def model_event(self, event: ModelEvent) -> None:
        for observer in self._observers:
            self._call(observer, "model_event", event)

    def request_done(self, record: RequestRecord) -> None:
        for observer in self._observers:
            self._call(observer, "request_done", record)

    def rejected(self, reason: str) -> None:
        for observer in self._observers:
            self._call(observer, "rejected", reason)

    def _call(self, observer: Observer, kind: str, argument: Any) -> None:
        try:
            getattr(observer, kind)(argument)
        except Exception:
            if (id(observer), kind) not in self._failed:
                self._failed.add((id(observer), kind))
                log.exception("observer %s failed in %s (logged once; requests go on)", type(observer).__name__,
                              kind)


class Recent:
    """The last hour of finished requests and model events, in memory: the dashboard's history and
    charts, and what its live view waits on (`changed`). Thread-safe."""

    def __init__(self, limit: int = RECENT_LIMIT, window_s: float = RECENT_WINDOW_S) -> None:
        self._requests: collections.deque[RequestRecord] = collections.deque(maxlen=limit)
        self._window_s = window_s
        self._lock = threading.Condition()
        self.version = 0  # bumped by every record and event, under _lock

    def model_event(self, event: ModelEvent) -> None:
        with self._lock:
            self.version += 1
            self._lock.notify_all()

    def request_done(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)
            self.version += 1
            self._lock.notify_all()

    def rejected(self, reason: str) -> None:
        return None

    def requests(self, since: float | None = None) -> list[RequestRecord]:
        """Return the requests that arrived after `since` (wall clock; default: the last hour), oldest first."""
        cutoff = max(since or 0.0, time.time() - self._window_s)
        with self._lock:
            return [record for record in self._requests if record.time >= cutoff]

    def wait(self, version: int, timeout_s: float) -> int:
        """Wait until something changed after `version` (or timeout_s); return the version now."""
        with self._lock:
            self._lock.wait_for(lambda: self.version != version, timeout=timeout_s)
            return self.version
