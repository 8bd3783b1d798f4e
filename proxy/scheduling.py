"""The scheduling policy: who is at the head of the queue, what must be evicted for it, who may take a lease now.

Pure functions over a Snapshot that the manager takes under its lock; the manager keeps the
state, the lock and the transitions, and acts on the answers. Also the states a model goes through.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.READY, State.FAILED, State.STOPPING}),  # stopping: a forced unload, shutdown
    State.READY: frozenset({State.STOPPING, State.STOPPED}),  # stopped: the backend exited by itself
    State.STOPPING: frozenset({State.STOPPED, State.STOPPING}),  # stopping: shutdown takes over a stop under way
    State.FAILED: frozenset({State.STARTING}),
}
"""The transitions a model may make; the manager refuses any other as a bug."""

LOADED = frozenset({State.STARTING, State.READY, State.STOPPING})  # states that hold a slot (memory)


@dataclass(frozen=True, slots=True)
class ModelView:
    """What the policy knows of one model. A pinned flag or a memory footprint would join here."""

    name: str
    state: State
    leases: int = 0
    last_used: float = 0.0   # the manager's clock: the least recently used idle model goes first
    unloading: bool = False  # an admin unload waits for its requests to end: it takes no new ones


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every model and the queue, as the manager holds them at one moment (under its lock)."""

    models: Mapping[str, ModelView]  # in configuration order: of two equal candidates the first goes
    queue: tuple[str, ...]           # the model each waiting request wants, oldest first
    max_loaded_models: int
    max_concurrent: int = 0          # leases per model at once; 0: no limit


# ----- answers ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Fits:
    """The wanted model may start now: nothing has to go."""


@dataclass(frozen=True, slots=True)
class Evict:
    """`victim` must go first. A busy one drains (takes no new leases) and stops when its last ends."""

    victim: str
    busy: bool


@dataclass(frozen=True, slots=True)
class NotYet:
    """Nothing can be decided now; ask again when a model changes state or a request leaves."""

    reason: str


Eviction = Fits | Evict | NotYet


@dataclass(frozen=True, slots=True)
class Grant:
    """Take a lease on the ready model."""


@dataclass(frozen=True, slots=True)
class Start:
    """Start the wanted model (the caller claims the start)."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the idle `victim` to make room for the wanted model (the caller claims the stop)."""

    victim: str


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait, for the reason given, until something changes."""

    reason: str


Decision = Grant | Start | Stop | Wait


# ----- the policy -------------------------------------------------------------------------------

def head(snapshot: Snapshot) -> int | None:
    """Return the position of the oldest ticket whose model is not ready: the only one that may start a model."""
    for position, name in enumerate(snapshot.queue):
        model = snapshot.models.get(name)
        # A model gone from the config (reload) starts nothing: its tickets answer 404 when they wake.
        if model is not None and model.state is not State.READY:
            return position
    return None


def eviction_for(snapshot: Snapshot, position: int) -> Eviction:
    """Say what must go before the model that the ticket at `position` wants (not a loaded one) may start.

    One victim at a time: once it has stopped, ask again. Models that tickets ahead of this one
    want are spared (FIFO: they are served first, then drained); idle models go before busy ones,
    the least recently used first.
    """
    loaded = [model for model in snapshot.models.values() if model.state in LOADED]
    if _fits(snapshot, loaded):
        return Fits()
    if any(model.state is not State.READY for model in loaded):
        return NotYet("a start or a stop is under way; decide when it is done")
    ahead = set(snapshot.queue[:position])
    candidates = [model for model in loaded if _evictable(model, ahead)]
    if not candidates:
        return NotYet("every loaded model is wanted by an earlier request")
    victim = min(candidates, key=lambda model: (model.leases > 0, model.last_used))
    return Evict(victim.name, busy=victim.leases > 0)


def _fits(snapshot: Snapshot, loaded: list[ModelView]) -> bool:
    """Say whether one more model may be loaded beside `loaded` (a memory budget would be checked here too)."""
    return len(loaded) < snapshot.max_loaded_models


def _evictable(model: ModelView, ahead: set[str]) -> bool:
    """Say whether `model` may be evicted for the head ticket (a pinned model would never be)."""
    return model.name not in ahead


def victim(snapshot: Snapshot) -> str | None:
    """Return the model the head ticket must evict (busy or idle), or None if none is chosen now."""
    position = head(snapshot)
    if position is None or snapshot.models[snapshot.queue[position]].state not in (State.STOPPED, State.FAILED):
        return None  # nobody waits for a slot, or the head's model is starting or stopping
    eviction = eviction_for(snapshot, position)
    return eviction.victim if isinstance(eviction, Evict) else None


def is_draining(snapshot: Snapshot, name: str) -> bool:
    """Say whether a ready model takes no new leases: an unload or a swap waits for its requests to end."""
    return snapshot.models[name].unloading or victim(snapshot) == name


def decide(snapshot: Snapshot, position: int) -> Decision:
    """Say what the ticket at `position` may do now: take a lease, start its model, stop a victim, or wait.

    Its model must be in the snapshot. Joining a start under way and failing with it are the
    caller's: they concern the ticket's own attempt, not the policy.
    """
    name = snapshot.queue[position]
    model = snapshot.models[name]
    if model.state is State.READY:
        return _lease_or_wait(snapshot, position, model)
    if model.state not in (State.STOPPED, State.FAILED):
        return Wait(f"the model is {model.state.value}")
    if head(snapshot) != position:
        return Wait("an earlier request starts or swaps in a model first")
    eviction = eviction_for(snapshot, position)
    if isinstance(eviction, Fits):
        return Start()
    if isinstance(eviction, Evict):
        return Wait(f"{eviction.victim} finishes its requests first") if eviction.busy else Stop(eviction.victim)
    return Wait(eviction.reason)


def _lease_or_wait(snapshot: Snapshot, position: int, model: ModelView) -> Grant | Wait:
    if is_draining(snapshot, model.name):
        return Wait("the model drains for an unload or a swap")
    limit = snapshot.max_concurrent
    if limit and model.leases >= limit:
        return Wait(f"{limit} requests are running on the model (proxy.max_concurrent)")
    if limit and snapshot.queue.index(model.name) != position:
        return Wait("an earlier request for the model goes first")  # first come, first served
    return Grant()
