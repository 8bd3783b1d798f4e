"""What the manager records of each model and hands out: ModelRecord (one model's mutable state,
read and written only by ModelManager under its lock), its views (ModelStatus for /status,
scheduling.ModelView for the policy), the tickets of waiting requests, leases, and state events.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from proxy.config import ModelConfig
from proxy.errors import BackendFailed, ProxyError
from proxy.launcher import Backend
from proxy.memory import Need, Placement
from proxy.scheduling import ModelView, State

Cancelled = Callable[[], bool]
"""Say whether a waiting request's client has left (waitress's client_disconnected)."""

# Ollama's "forever" is 2^63 ns (Go's longest Duration). Longer idle times are "never" too:
# they cannot be shown as an expiry date (datetime ends in 9999) and would never arrive anyway.
LONGEST_KEEP_ALIVE_S = 2 ** 63 / 1e9


def never_if_unrepresentable(keep_alive_s: float) -> float:
    """Return keep_alive_s, or math.inf (never unload) when it is longer than an expiry date can say."""
    return math.inf if keep_alive_s > LONGEST_KEEP_ALIVE_S else keep_alive_s


@dataclass(frozen=True, slots=True)
class ModelStatus:
    name: str
    state: str
    pid: int | None
    port: int | None
    leases: int
    queued: int
    keep_alive_s: float
    expires_at: datetime | None  # wall clock; None while in use or not loaded
    ready_since: datetime | None
    last_error: str | None
    last_output: str | None  # the output tail behind last_error: for admins only (paths, argv, tracebacks)
    backend: str
    requests_served: int
    progress: str | None = None  # load progress of an in-place (resident) load
    need: Need = Need()          # its footprint, and where that came from
    holds: Placement = field(default_factory=dict)  # what it takes on each device while loaded
    pinned: bool = False
    loading_s: float | None = None     # while starting: seconds since the start began
    last_load_s: float | None = None   # how long its last successful start took
    url: str | None = None             # a server elsewhere (remote, a peer's model): its URL, without credentials
    peer: str | None = None            # the peer proxy that lists it


class ModelRecord:
    """Mutable state of one model. Every field is guarded by ModelManager._cond."""

    def __init__(self, model: ModelConfig, keep_alive_s: float) -> None:
        self.model = model
        self.state = State.STOPPED       # changed only by ModelManager._set_state
        self.process: Backend | None = None
        self.generation = 0              # bumped by every load and unload; stale work is discarded
        self.attempt = 0                 # start attempts; waiters of a failed one get its error
        self.failed_attempt = -1
        self.leases = 0
        self.default_keep_alive_s = keep_alive_s
        self.keep_alive_s = keep_alive_s
        self.deadline = math.inf         # monotonic; meaningful when READY with no leases
        self.last_used = 0.0
        self.last_error: str | None = None   # a summary: what clients may see
        self.last_output: str | None = None  # the backend's output tail with it: for the log and admins
        self.failure_type: type[ProxyError] = BackendFailed  # BackendTimeout when the start timed out
        self.unloads_pending = 0         # admin unloads waiting for the leases to drain
        self.ready_since: float | None = None
        self.requests_served = 0
        self.replacement: ModelConfig | None = None  # a reloaded profile, used from the next start
        self.removed = False             # its profile is gone: refuse requests, drop once stopped
        self.holds: dict[str, int] = {}  # the memory it takes per device while loaded (placed, then measured)
        self.starting_since: float | None = None  # monotonic, while STARTING
        self.last_load_s: float | None = None     # its last successful start's duration

    def view(self, need: Need) -> ModelView:
        """Return what the scheduling policy needs of this model, whose footprint is `need`."""
        return ModelView(self.model.name, self.state, self.leases, self.last_used, self.unloads_pending > 0,
                         need, self.holds, self.model.pinned, local=self.model.runs_here)

    def status(self, queued: int, now_mono: float, now_wall: datetime, need: Need = Need()) -> ModelStatus:
        """Return this model's /status entry; `queued` requests wait for it."""
        expires_at = None
        if self.state is State.READY and self.leases == 0 and not math.isinf(self.deadline):
            expires_at = now_wall + timedelta(seconds=max(0.0, self.deadline - now_mono))
        process = self.process
        return ModelStatus(
            name=self.model.name,
            state=self.state.value,
            pid=process.pid if process is not None else None,
            port=process.port if process is not None else None,
            leases=self.leases,
            queued=queued,
            keep_alive_s=self.keep_alive_s,
            expires_at=expires_at,
            ready_since=datetime.fromtimestamp(self.ready_since, timezone.utc) if self.ready_since else None,
            last_error=self.last_error,
            last_output=self.last_output,
            backend=self.model.backend,
            requests_served=self.requests_served,
            progress=process.progress if process is not None and self.state is State.STARTING else None,
            need=need,
            holds=dict(self.holds),
            pinned=self.model.pinned,
            loading_s=(time.monotonic() - self.starting_since
                       if self.state is State.STARTING and self.starting_since is not None else None),
            last_load_s=self.last_load_s,
            url=None if self.model.remote is None else self.model.remote.endpoint.url,
            peer=None if self.model.remote is None else self.model.remote.peer,
        )


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """A model's state transition, as the manager commits it."""

    model: str
    previous: State
    state: State
    reason: str
    cause: str = ""  # why a model stops: idle, keep_alive_0, swap, evicted, requested, crashed, reload, shutdown


Listener = Callable[[ModelEvent], None]
"""Told of every state transition, under the manager's lock and in the order they happen: it must
return quickly and never call the manager (hand the event to a queue or a counter). An exception
it raises is logged and dropped."""


class Ticket:
    """A request waiting for a lease, in arrival order."""

    def __init__(self, name: str, keep_alive_s: float | None, cancelled: Cancelled | None = None) -> None:
        self.name = name
        self.keep_alive_s = keep_alive_s
        self.cancelled = cancelled
        self.attempt_seen: int | None = None


class Lease:
    """Permission to send requests to a ready model; release() exactly once (extra calls are no-ops).

    `on_release` is the manager's: it counts the lease off the model that granted it."""

    def __init__(self, model: ModelConfig, process: Backend, on_release: Callable[[], None]) -> None:
        self._on_release = on_release
        self._backend = process
        self.model = model
        self.base_url = process.base_url
        self.headers = process.headers
        self.waited_s = 0.0  # how long the request waited for it (queue, swap, load)
        self.loaded = False  # the request started, or waited for, a load of the model
        self.granted_at = time.monotonic()
        self._released = False

    @property
    def model_name(self) -> str:
        return self.model.name

    def report_failure(self) -> None:
        """Say that a request on this lease could not reach the backend or lost it mid-answer: the backend
        looks whether it is still there (a remote one that is gone makes the manager mark it stopped,
        so the next request checks it anew). Blocks at most a remote's `timeout`."""
        self._backend.check_alive()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._on_release()
