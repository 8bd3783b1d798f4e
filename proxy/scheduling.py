"""The scheduling policy: who is at the head of the queue, what must be evicted for it, who may take a lease now.

Pure functions over a Snapshot that the manager takes under its lock; the manager keeps the
state, the lock and the transitions, and acts on the answers. Also the states a model goes through.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.memory import Need, Placement, format_placement, format_size, gpu_index


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

LOADED = frozenset({State.STARTING, State.READY, State.STOPPING})  # states that hold a slot (memory), if local


@dataclass(frozen=True, slots=True)
class ModelView:
    """What the policy knows of one model."""

    name: str
    state: State
    leases: int = 0
    last_used: float = 0.0   # the manager's clock: the least recently used idle model goes first
    unloading: bool = False  # an admin unload waits for its requests to end: it takes no new ones
    need: Need = Need()      # its footprint, for a start
    holds: Placement = field(default_factory=dict)  # what it takes on each device while loaded
    pinned: bool = False     # never evicted for another model
    local: bool = True       # False: it runs on another machine and takes no slot and no memory here


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every model and the queue, as the manager holds them at one moment (under its lock)."""

    models: Mapping[str, ModelView]  # in configuration order: of two equal candidates the first goes
    queue: tuple[str, ...]           # the model each waiting request wants, oldest first
    max_loaded_models: int
    max_concurrent: int = 0          # leases per model at once; 0: no limit
    budgets: Mapping[str, int] = field(default_factory=dict)  # bytes per device; empty: memory is not counted


# ----- answers ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Fits:
    """The wanted model may start now, taking `placement`: nothing has to go."""

    placement: Placement = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Evict:
    """`victim` must go first. A busy one drains (takes no new leases) and stops when its last ends."""

    victim: str
    busy: bool
    why: str = field(default="", compare=False)  # for the log line of the eviction
    cause: str = field(default="swap", compare=False)  # swap: for the count of models; evicted: for memory


@dataclass(frozen=True, slots=True)
class NotYet:
    """Nothing can be decided now; ask again when a model changes state or a request leaves."""

    reason: str


@dataclass(frozen=True, slots=True)
class Never:
    """The wanted model cannot fit even with every model that may be evicted gone: refuse, evict nothing."""

    reason: str


Eviction = Fits | Evict | NotYet | Never


@dataclass(frozen=True, slots=True)
class Grant:
    """Take a lease on the ready model."""


@dataclass(frozen=True, slots=True)
class Start:
    """Start the wanted model on `placement` (the caller claims the start)."""

    placement: Placement = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the idle `victim` to make room for the wanted model (the caller claims the stop)."""

    victim: str
    why: str = field(default="", compare=False)
    cause: str = field(default="swap", compare=False)


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait, for the reason given, until something changes."""

    reason: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """The wanted model can never fit beside what may not be evicted: answer at once, for the reason given."""

    reason: str


Decision = Grant | Start | Stop | Wait | Refuse


# ----- the policy -------------------------------------------------------------------------------

def head(snapshot: Snapshot) -> int | None:
    """Return the position of the oldest ticket whose local model is not ready: the only one that may start
    a local model (a remote one takes no slot, so its tickets never queue behind a swap, nor hold one up)."""
    for position, name in enumerate(snapshot.queue):
        model = snapshot.models.get(name)
        # A model gone from the config (reload) starts nothing: its tickets answer 404 when they wake.
        if model is not None and model.local and model.state is not State.READY:
            return position
    return None


def eviction_for(snapshot: Snapshot, position: int) -> Eviction:
    """Say what must go before the model that the ticket at `position` wants (not a loaded one) may start.

    One victim at a time: once it has stopped, ask again. A model fits when one more is allowed
    (proxy.max_loaded_models) and, with budgets, its footprint fits every device it would use;
    a model without `gpus` is placed on the GPU that needs the fewest evictions, then where it
    fits best (the least room left over). Victims are models that take room where it is short:
    idle before busy, the least recently used first; pinned models and those that tickets ahead
    of this one want are spared (FIFO: they are served first, then drained).
    """
    wanted = snapshot.models[snapshot.queue[position]]
    if not wanted.local:
        return Fits()  # on another machine: no slot, no memory here
    loaded = [model for model in snapshot.models.values() if model.local and model.state in LOADED]
    options = _placements(snapshot, wanted.need)
    fitting = [placement for placement in options if _fits(snapshot, loaded, placement)]
    if fitting:
        return Fits(min(fitting, key=lambda placement: _room_left(snapshot, loaded, placement)))
    never = _never(snapshot, wanted, loaded, options)
    if never is not None:
        return Never(never)
    if any(model.state is not State.READY for model in loaded):
        return NotYet("a start or a stop is under way; decide when it is done")
    ahead = set(snapshot.queue[:position])
    plans = [plan for plan in (_victims(snapshot, loaded, placement, ahead) for placement in options) if plan]
    if not plans:
        return NotYet("every loaded model is wanted by an earlier request")
    victims, placement = min(plans, key=lambda plan: (sum(model.leases > 0 for model in plan[0]), len(plan[0]),
                                                      _room_left(snapshot, loaded, plan[1])))
    chosen = victims[0]
    return Evict(chosen.name, busy=chosen.leases > 0, why=_why(snapshot, loaded, chosen, wanted, placement),
                 cause="evicted" if _short(snapshot, loaded, placement) else "swap")


def _placements(snapshot: Snapshot, need: Need) -> list[Placement]:
    """Return where `need` could go: its own GPUs, or each budgeted GPU in turn (or none: VRAM is not counted)."""
    if need.gpus is not None or not need.vram:
        return [need.on(need.gpus or ())]
    gpus = sorted(index for index in (gpu_index(device) for device in snapshot.budgets) if index is not None)
    return [need.on((index,)) for index in gpus] or [need.on(())]


def _used(loaded: list[ModelView], device: str) -> int:
    return sum(model.holds.get(device, 0) for model in loaded)


def _short(snapshot: Snapshot, loaded: list[ModelView], placement: Placement) -> list[str]:
    """Return the budgeted devices where `placement` does not fit beside `loaded`."""
    return [device for device, size in placement.items()
            if device in snapshot.budgets and _used(loaded, device) + size > snapshot.budgets[device]]


def _fits(snapshot: Snapshot, loaded: list[ModelView], placement: Placement) -> bool:
    """Say whether one more model, taking `placement`, may be loaded beside `loaded`."""
    return len(loaded) < snapshot.max_loaded_models and not _short(snapshot, loaded, placement)


def _room_left(snapshot: Snapshot, loaded: list[ModelView], placement: Placement) -> int:
    """Return the budgeted room left on the placement's devices after it: the best fit leaves the least."""
    return sum(snapshot.budgets[device] - _used(loaded, device) - size
               for device, size in placement.items() if device in snapshot.budgets)


def _evictable(model: ModelView, ahead: set[str]) -> bool:
    """Say whether `model` may be evicted for the head ticket now."""
    return not model.pinned and model.name not in ahead


def _victims(snapshot: Snapshot, loaded: list[ModelView], placement: Placement,
             ahead: set[str]) -> tuple[list[ModelView], Placement] | None:
    """Return the models to evict, in order, for `placement` to fit; None when sparing the others it cannot."""
    remaining = list(loaded)
    victims: list[ModelView] = []
    candidates = sorted((model for model in loaded if _evictable(model, ahead)),
                        key=lambda model: (model.leases > 0, model.last_used))
    for candidate in candidates:
        if _fits(snapshot, remaining, placement):
            break
        short = _short(snapshot, remaining, placement)
        if len(remaining) < snapshot.max_loaded_models and not any(candidate.holds.get(device) for device in short):
            continue  # the count allows one more: only room where it is short helps
        victims.append(candidate)
        remaining.remove(candidate)
    if not victims or not _fits(snapshot, remaining, placement):
        return None
    for spared in reversed(victims[:-1]):  # one taken early for the count may not be needed after all
        if _fits(snapshot, [*remaining, spared], placement):
            victims.remove(spared)
            remaining.append(spared)
    return victims, placement


def _never(snapshot: Snapshot, wanted: ModelView, loaded: list[ModelView], options: list[Placement]) -> str | None:
    """Return why the wanted model can fit nowhere even with every unpinned model gone, or None if it can."""
    pinned = [model for model in loaded if model.pinned]
    if any(_fits(snapshot, pinned, placement) for placement in options):
        return None
    if len(pinned) >= snapshot.max_loaded_models:
        return (f"{wanted.name}: {len(pinned)} pinned model(s) ({', '.join(model.name for model in pinned)}) take "
                f"every one of proxy.max_loaded_models ({snapshot.max_loaded_models})")
    placement = min(options, key=lambda option: len(_short(snapshot, pinned, option)))
    gaps = [f"{device} has {format_size(snapshot.budgets[device])}"
            + (f", {format_size(_used(pinned, device))} of it pinned" if _used(pinned, device) else "")
            for device in _short(snapshot, pinned, placement)]
    where = "any GPU" if wanted.need.gpus is None and wanted.need.vram and len(options) > 1 else "it"
    return (f"{wanted.name} needs {format_placement(placement)} ({wanted.need.source} footprint) and cannot fit on "
            f"{where}: {'; '.join(gaps)}")


def _why(snapshot: Snapshot, loaded: list[ModelView], chosen: ModelView, wanted: ModelView,
         placement: Placement) -> str:
    """Say why `chosen` is evicted for `wanted`: for the log line of the eviction."""
    which = f"the least recently used {'busy model (it drains first)' if chosen.leases else 'idle model'}"
    short = _short(snapshot, loaded, placement)
    if not short:
        return f"{which}; proxy.max_loaded_models ({snapshot.max_loaded_models}) reached"
    rooms = ", ".join(f"{format_size(max(0, snapshot.budgets[device] - _used(loaded, device)))} of "
                      f"{format_size(snapshot.budgets[device])} free on {device}" for device in short)
    return f"{which} on {', '.join(short)}; {wanted.name} needs {format_placement(placement)}, {rooms}"


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
    if not model.local:
        return Start()  # takes nothing here: no queue to wait in, nothing to evict
    if head(snapshot) != position:
        return Wait("an earlier request starts or swaps in a model first")
    eviction = eviction_for(snapshot, position)
    if isinstance(eviction, Fits):
        return Start(eviction.placement)
    if isinstance(eviction, Evict):
        if eviction.busy:
            return Wait(f"{eviction.victim} finishes its requests first")
        return Stop(eviction.victim, eviction.why, eviction.cause)
    if isinstance(eviction, Never):
        return Refuse(eviction.reason)
    return Wait(eviction.reason)


def grants_at_once(model: ModelView, max_concurrent: int) -> bool:
    """Say what decide() says for a request when nobody else waits: a Grant exactly when the model is
    ready, takes new leases (no admin unload waits on it; with no other ticket none is at the head
    to make it a swap's victim) and is below max_concurrent. The manager asks this for every request
    first, without building a snapshot of every model; tests/test_scheduling.py checks the two agree.
    """
    return model.state is State.READY and not model.unloading and not _at_limit(model, max_concurrent)


def _at_limit(model: ModelView, limit: int) -> bool:
    return bool(limit) and model.leases >= limit


def _lease_or_wait(snapshot: Snapshot, position: int, model: ModelView) -> Grant | Wait:
    if is_draining(snapshot, model.name):
        return Wait("the model drains for an unload or a swap")
    limit = snapshot.max_concurrent
    if _at_limit(model, limit):
        return Wait(f"{limit} requests are running on the model (proxy.max_concurrent)")
    if limit and snapshot.queue.index(model.name) != position:
        return Wait("an earlier request for the model goes first")  # first come, first served
    return Grant()
