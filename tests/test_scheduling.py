"""The scheduling policy, table-driven: pure functions over snapshots, no threads, no sleeps.

Each case names a situation (models and the queue) and what the policy answers in it.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.memory import Need
from proxy.scheduling import (
    TRANSITIONS,
    Decision,
    Evict,
    Eviction,
    Fits,
    Grant,
    Never,
    Refuse,
    ModelView,
    NotYet,
    Snapshot,
    Start,
    State,
    Stop,
    Wait,
    decide,
    eviction_for,
    grants_at_once,
    head,
    is_draining,
    victim,
)

STOPPED, STARTING, READY, STOPPING, FAILED = (State.STOPPED, State.STARTING, State.READY, State.STOPPING,
                                              State.FAILED)


def m(name: str, state: State = READY, leases: int = 0, last_used: float = 0.0, unloading: bool = False) -> ModelView:
    return ModelView(name, state, leases=leases, last_used=last_used, unloading=unloading)


def snap(*models: ModelView, queue: str = "", max_loaded: int = 1, max_concurrent: int = 0) -> Snapshot:
    """Models in configuration order; `queue` names the model of each waiting request, oldest first."""
    return Snapshot({model.name: model for model in models}, tuple(queue), max_loaded, max_concurrent)


# ----- who is at the head -------------------------------------------------------------------------

@pytest.mark.parametrize("snapshot, expected", [
    pytest.param(snap(m("a"), m("b", STOPPED)), None, id="nobody-waits"),
    pytest.param(snap(m("a"), m("b"), queue="ab", max_loaded=2), None, id="every-wanted-model-is-ready"),
    pytest.param(snap(m("a"), m("b", STOPPED), queue="aab"), 2, id="the-oldest-ticket-whose-model-is-not-ready"),
    pytest.param(snap(m("a", STARTING), m("b", STOPPED), queue="ba"), 0, id="arrival-order-not-config-order"),
    pytest.param(snap(m("a", STARTING), queue="a"), 0, id="a-starting-model-keeps-its-ticket-at-the-head"),
    pytest.param(snap(m("a"), m("b", STOPPED), queue="gb"), 1, id="a-model-removed-by-a-reload-starts-nothing"),
])
def test_head_is_the_oldest_ticket_whose_model_is_not_ready(snapshot: Snapshot, expected: int | None) -> None:
    assert head(snapshot) == expected


# ----- what must be evicted -----------------------------------------------------------------------

@pytest.mark.parametrize("snapshot, expected", [
    pytest.param(snap(m("a", STOPPED), queue="a"), Fits(), id="a-free-slot"),
    pytest.param(snap(m("a"), m("b", FAILED), queue="b", max_loaded=2), Fits(), id="a-failed-model-holds-no-slot"),
    pytest.param(snap(m("a", last_used=2), m("b", last_used=1), m("c", STOPPED), queue="c", max_loaded=2),
                 Evict("b", busy=False), id="the-least-recently-used-idle-model-goes"),
    pytest.param(snap(m("a", leases=1, last_used=1), m("b", last_used=2), m("c", STOPPED), queue="c", max_loaded=2),
                 Evict("b", busy=False), id="idle-before-busy-however-old"),
    pytest.param(snap(m("a", leases=2, last_used=2), m("b", leases=1, last_used=1), m("c", STOPPED), queue="c",
                      max_loaded=2),
                 Evict("b", busy=True), id="every-model-busy-the-lru-one-drains-never-cut"),
    pytest.param(snap(m("a"), m("b"), m("c", STOPPED), queue="c", max_loaded=2),
                 Evict("a", busy=False), id="a-tie-goes-to-the-first-in-configuration-order"),
    pytest.param(snap(m("a", STARTING), m("b", STOPPED), queue="ab"),
                 NotYet("a start or a stop is under way; decide when it is done"), id="a-starting-model-holds-a-slot"),
    pytest.param(snap(m("a", STOPPING), m("b", STOPPED), queue="b"),
                 NotYet("a start or a stop is under way; decide when it is done"), id="a-stopping-model-holds-a-slot"),
    pytest.param(snap(m("a"), m("b", STOPPING), m("c", STOPPED), queue="c", max_loaded=2),
                 NotYet("a start or a stop is under way; decide when it is done"),
                 id="full-with-a-stop-under-way-no-second-victim"),
    pytest.param(snap(m("a", STOPPING), m("b", STOPPED), queue="b", max_loaded=2), Fits(),
                 id="a-slot-left-beside-a-stopping-model"),
    pytest.param(snap(m("a", last_used=1), m("b", last_used=2), m("c", STOPPED), queue="ac", max_loaded=2),
                 Evict("b", busy=False), id="a-model-a-ticket-ahead-waits-for-is-spared"),
    pytest.param(snap(m("a"), m("b"), m("c", STOPPED), queue="bac", max_loaded=2),
                 NotYet("every loaded model is wanted by an earlier request"), id="every-loaded-model-wanted-ahead"),
    pytest.param(snap(m("a", last_used=1), m("b", last_used=2), m("c", STOPPED), queue="ca", max_loaded=2),
                 Evict("a", busy=False), id="a-ticket-behind-spares-nothing"),
    pytest.param(snap(m("a", last_used=2), m("b", last_used=1), m("c", STOPPED), queue="c", max_loaded=1),
                 Evict("b", busy=False), id="over-a-lowered-limit-one-victim-at-a-time"),
])
def test_eviction_for_the_head(snapshot: Snapshot, expected: Eviction) -> None:
    position = head(snapshot)
    assert position is not None
    assert eviction_for(snapshot, position) == expected


# ----- what one ticket may do now -----------------------------------------------------------------

@pytest.mark.parametrize("snapshot, position, expected", [
    pytest.param(snap(m("a"), queue="a"), 0, Grant(), id="ready-takes-a-lease"),
    pytest.param(snap(m("a", leases=5), queue="a"), 0, Grant(), id="no-limit-on-leases-by-default"),
    pytest.param(snap(m("a", STOPPED), queue="a"), 0, Start(), id="the-head-starts-its-model"),
    pytest.param(snap(m("a", FAILED), queue="a"), 0, Start(), id="a-failed-model-is-tried-again"),
    pytest.param(snap(m("a", STOPPED), m("b", STOPPED), queue="ab", max_loaded=2), 1,
                 Wait("an earlier request starts or swaps in a model first"), id="only-the-head-starts"),
    pytest.param(snap(m("a", STARTING), queue="aa"), 1, Wait("the model is starting"), id="waits-for-a-start"),
    pytest.param(snap(m("a", STOPPING), queue="a"), 0, Wait("the model is stopping"), id="waits-for-a-stop"),
    pytest.param(snap(m("a"), m("b", STOPPED), queue="b"), 0, Stop("a"), id="the-head-stops-an-idle-victim"),
    pytest.param(snap(m("a", leases=1), m("b", STOPPED), queue="b"), 0, Wait("a finishes its requests first"),
                 id="the-head-waits-while-a-busy-victim-drains"),
    pytest.param(snap(m("a", STOPPING), m("b", STOPPED), queue="b"), 0,
                 Wait("a start or a stop is under way; decide when it is done"), id="not-yet-while-a-victim-stops"),
    pytest.param(snap(m("a", leases=1), m("b", STOPPED), queue="ba"), 1,
                 Wait("the model drains for an unload or a swap"), id="new-requests-queue-behind-a-swap"),
    pytest.param(snap(m("a"), m("b", STOPPED), queue="ab"), 0, Grant(),
                 id="requests-queued-before-a-swap-are-served-first"),
    pytest.param(snap(m("a", unloading=True), queue="a"), 0, Wait("the model drains for an unload or a swap"),
                 id="an-admin-unload-drains-the-model"),
    pytest.param(snap(m("a", leases=2), queue="a", max_concurrent=2), 0,
                 Wait("2 requests are running on the model (proxy.max_concurrent)"), id="max-concurrent-reached"),
    pytest.param(snap(m("a", leases=1), queue="aa", max_concurrent=2), 0, Grant(), id="room-for-the-first-in-line"),
    pytest.param(snap(m("a", leases=1), queue="aa", max_concurrent=2), 1,
                 Wait("an earlier request for the model goes first"), id="room-is-first-come-first-served"),
    pytest.param(snap(m("a", leases=1), m("b"), queue="ba", max_concurrent=2, max_loaded=2), 1, Grant(),
                 id="another-models-ticket-is-not-ahead-for-room"),
])
def test_decide(snapshot: Snapshot, position: int, expected: Decision) -> None:
    assert decide(snapshot, position) == expected


@pytest.mark.parametrize("snapshot, name, expected", [
    pytest.param(snap(m("a"), m("b", STOPPED), queue="b"), "a", True, id="the-victim-of-the-head"),
    pytest.param(snap(m("a"), m("b", STOPPED), queue="b", max_loaded=2), "a", False, id="no-victim-when-it-fits"),
    pytest.param(snap(m("a"), m("b", STARTING), queue="b", max_loaded=2), "a", False, id="no-victim-for-a-start"),
    pytest.param(snap(m("a"), m("b", STOPPED), queue="ab"), "a", False, id="spared-for-a-ticket-ahead"),
    pytest.param(snap(m("a", unloading=True)), "a", True, id="an-admin-unload-waits"),
    pytest.param(snap(m("a")), "a", False, id="nobody-waits"),
])
def test_is_draining(snapshot: Snapshot, name: str, expected: bool) -> None:
    assert is_draining(snapshot, name) is expected


def test_victim_is_none_while_the_head_model_stops() -> None:
    assert victim(snap(m("a"), m("b", STOPPING), queue="b", max_loaded=2)) is None


def test_a_swap_goes_step_by_step_without_waiting() -> None:
    """The life of one swap as the policy sees it, each step a snapshot: no clock, no thread."""
    busy = snap(m("a", leases=1, last_used=1), m("b", STOPPED), queue="ba")
    assert decide(busy, 0) == Wait("a finishes its requests first")  # not yet: a still serves
    assert decide(busy, 1) == Wait("the model drains for an unload or a swap")  # a late request for a waits

    drained = snap(m("a", last_used=2), m("b", STOPPED), queue="ba")
    assert decide(drained, 0) == Stop("a")
    stopping = snap(m("a", STOPPING), m("b", STOPPED), queue="ba")
    assert decide(stopping, 0) == Wait("a start or a stop is under way; decide when it is done")
    stopped = snap(m("a", STOPPED), m("b", STOPPED), queue="ba")
    assert decide(stopped, 0) == Start()
    assert decide(stopped, 1) == Wait("an earlier request starts or swaps in a model first")
    ready = snap(m("a", STOPPED), m("b"), queue="ba")
    assert decide(ready, 0) == Grant()


# ----- the lifecycle ------------------------------------------------------------------------------

ALLOWED = {
    (STOPPED, STARTING),
    (STARTING, READY), (STARTING, FAILED), (STARTING, STOPPING),
    (READY, STOPPING), (READY, STOPPED),
    (STOPPING, STOPPED), (STOPPING, STOPPING),
    (FAILED, STARTING),
}


@pytest.mark.parametrize("previous, state", list(itertools.product(State, State)),
                         ids=lambda state: state.value)
def test_transitions_table(previous: State, state: State) -> None:
    assert (state in TRANSITIONS[previous]) is ((previous, state) in ALLOWED)


# ----- memory: budgets, footprints, placement, pinning ---------------------------------------------

GiB = 1024 ** 3


def g(name: str, vram: float, state: State = READY, *, on: int | None = 0, gpus: tuple[int, ...] | None = None,
      leases: int = 0, last_used: float = 0.0, pinned: bool = False, ram: float = 0) -> ModelView:
    """A model needing `vram` GiB (and `ram` GiB); while loaded it holds them on GPU `on` (or its `gpus`)."""
    need = Need(vram=int(vram * GiB), ram=int(ram * GiB), gpus=gpus, source="declared")
    holds = need.on(gpus or ((on,) if on is not None else ())) if state in (STARTING, READY, STOPPING) else {}
    return ModelView(name, state, leases=leases, last_used=last_used, need=need, holds=holds, pinned=pinned)


def budget(*sizes: float, ram: float | None = None, max_loaded: int = 9) -> dict[str, object]:
    budgets = {f"gpu{index}": int(size * GiB) for index, size in enumerate(sizes)}
    if ram is not None:
        budgets["ram"] = int(ram * GiB)
    return {"budgets": budgets, "max_loaded": max_loaded}


def msnap(*models: ModelView, queue: str, budgets: dict[str, int], max_loaded: int = 9) -> Snapshot:
    return Snapshot({model.name: model for model in models}, tuple(queue), max_loaded, 0, budgets)


def on_gpu(index: int, size: float) -> dict[str, int]:
    return {f"gpu{index}": int(size * GiB)}


@pytest.mark.parametrize("models, queue, limits, expected", [
    pytest.param([g("a", 10), g("b", 10, STOPPED)], "b", budget(24), Fits(on_gpu(0, 10)),
                 id="fits-beside-a-loaded-model"),
    pytest.param([g("a", 10, last_used=2), g("b", 10, last_used=1), g("c", 10, STOPPED)], "c", budget(24),
                 Evict("b", busy=False), id="evicts-the-lru-idle-model-when-memory-is-short"),
    pytest.param([g("a", 20, last_used=1), g("b", 2, last_used=2), g("c", 10, STOPPED)], "c", budget(24),
                 Evict("a", busy=False), id="evicts-only-what-makes-room"),
    pytest.param([g("a", 12, last_used=1, leases=1), g("b", 10, last_used=2), g("c", 10, STOPPED)], "c",
                 budget(24), Evict("b", busy=False), id="idle-before-busy"),
    pytest.param([g("a", 12, leases=1, last_used=1), g("b", 10, leases=2, last_used=2), g("c", 10, STOPPED)], "c",
                 budget(24), Evict("a", busy=True), id="drains-a-busy-one-never-cuts-it"),
    pytest.param([g("a", 12, pinned=True), g("b", 10, last_used=5), g("c", 10, STOPPED)], "c", budget(24),
                 Evict("b", busy=False), id="spares-a-pinned-model"),
    pytest.param([g("a", 12, pinned=True), g("c", 20, STOPPED)], "c", budget(24),
                 Never("c needs 20 GiB on gpu0 (declared footprint) and cannot fit on it: gpu0 has 24 GiB, "
                       "12 GiB of it pinned"), id="refuses-what-only-evicting-a-pinned-model-would-fit"),
    pytest.param([g("a", 4), g("c", 30, STOPPED)], "c", budget(24),
                 Never("c needs 30 GiB on gpu0 (declared footprint) and cannot fit on it: gpu0 has 24 GiB"),
                 id="refuses-what-can-never-fit-and-evicts-nothing"),
    pytest.param([g("a", 4, on=0), g("b", 4, on=1), g("c", 18, STOPPED, on=None)], "c", budget(24, 24),
                 Fits(on_gpu(0, 18)), id="placed-on-the-first-gpu-where-it-fits"),
    pytest.param([g("a", 8, on=0), g("b", 4, on=1), g("c", 14, STOPPED, on=None)], "c", budget(24, 24),
                 Fits(on_gpu(0, 14)), id="best-fit-the-gpu-left-with-the-least-room"),
    pytest.param([g("a", 20, on=0), g("b", 4, on=1), g("c", 10, STOPPED, on=None)], "c", budget(24, 24),
                 Fits(on_gpu(1, 10)), id="the-gpu-where-it-fits-without-eviction"),
    pytest.param([g("a", 20, on=0, last_used=1), g("b", 16, on=1, last_used=2), g("c", 10, STOPPED, on=None)],
                 "c", budget(24, 24), Evict("a", busy=False), id="several-gpus-evicts-on-the-best-one"),
    pytest.param([g("a", 20, on=0, last_used=1), g("b", 16, on=1, last_used=2, leases=1),
                  g("c", 10, STOPPED, on=None)], "c", budget(24, 24), Evict("a", busy=False),
                 id="prefers-the-gpu-where-an-idle-model-can-go"),
    pytest.param([g("a", 20, on=0, leases=1), g("b", 20, on=1, last_used=2), g("c", 10, STOPPED, gpus=(0,))],
                 "c", budget(24, 24), Evict("a", busy=True), id="a-declared-gpu-is-where-it-goes"),
    pytest.param([g("a", 8, on=0), g("b", 8, on=1), g("c", 30, STOPPED, gpus=(0, 1))], "c", budget(24, 24),
                 Fits({"gpu0": 15 * GiB, "gpu1": 15 * GiB}), id="a-split-across-two-gpus-fits"),
    pytest.param([g("a", 12, on=0, last_used=1), g("b", 8, on=1, last_used=2), g("c", 30, STOPPED, gpus=(0, 1))],
                 "c", budget(24, 24), Evict("a", busy=False), id="a-split-evicts-where-it-is-short"),
    pytest.param([g("a", 0, ram=6, on=None), g("b", 0, ram=6, on=None, last_used=1), g("c", 0, STOPPED, ram=6)],
                 "c", budget(ram=12), Evict("a", busy=False), id="ram-budget"),
    pytest.param([g("a", 0, ram=6, on=None), g("c", 10, STOPPED, on=None)], "c", budget(24, ram=6),
                 Fits(on_gpu(0, 10)), id="ram-and-vram-are-separate-budgets"),
    pytest.param([g("a", 4), g("b", 4, last_used=1), g("c", 4, STOPPED)], "c", budget(24, max_loaded=2),
                 Evict("a", busy=False), id="max-loaded-models-still-applies"),
    pytest.param([g("a", 4, last_used=1), g("b", 18, last_used=2, on=1), g("c", 10, STOPPED, gpus=(1,))],
                 "c", budget(24, 24, max_loaded=2), Evict("b", busy=False),
                 id="one-victim-serves-count-and-memory-none-wasted"),
    pytest.param([g("a", 12, last_used=1), g("b", 10, last_used=2), g("c", 10, STOPPED)], "ac", budget(24),
                 Evict("b", busy=False), id="a-model-a-ticket-ahead-wants-is-spared"),
    pytest.param([g("a", 12, STOPPING), g("c", 20, STOPPED)], "c", budget(24),
                 NotYet("a start or a stop is under way; decide when it is done"), id="waits-for-a-stop-to-finish"),
    pytest.param([g("a", 12, STOPPING, on=1), g("c", 20, STOPPED, gpus=(0,))], "c", budget(24, 24),
                 Fits(on_gpu(0, 20)), id="a-stop-on-another-gpu-does-not-hold-it-up"),
    pytest.param([g("a", 20, pinned=True), g("b", 0, STOPPED, on=None)], "b", budget(24),
                 Fits({}), id="an-unknown-footprint-counts-as-nothing"),
])
def test_memory_eviction(models: list[ModelView], queue: str, limits: dict[str, object], expected: Eviction) -> None:
    snapshot = msnap(*models, queue=queue, **limits)  # type: ignore[arg-type]
    position = head(snapshot)
    assert position is not None
    assert eviction_for(snapshot, position) == expected


def test_eviction_says_why_it_chose_its_victim() -> None:
    snapshot = msnap(g("a", 10, last_used=2), g("b", 10, last_used=1), g("c", 10, STOPPED), queue="c",
                     **budget(24))  # type: ignore[arg-type]
    eviction = eviction_for(snapshot, 0)
    assert isinstance(eviction, Evict)
    assert eviction.why == "the least recently used idle model on gpu0; c needs 10 GiB on gpu0, 4 GiB of 24 GiB free on gpu0"
    assert decide(snapshot, 0) == Stop("b")


def test_a_pinned_model_taking_every_slot_refuses_the_others() -> None:
    snapshot = msnap(g("a", 1, pinned=True), g("b", 1, STOPPED), queue="b", **budget(24, max_loaded=1))  # type: ignore[arg-type]
    assert decide(snapshot, 0) == Refuse("b: 1 pinned model(s) (a) take every one of proxy.max_loaded_models (1)")


def test_without_budgets_memory_is_not_counted() -> None:
    snapshot = snap(g("a", 100), g("b", 100, STOPPED), queue="b", max_loaded=2)
    assert decide(snapshot, 0) == Start()


def test_a_memory_swap_step_by_step() -> None:
    """Two 14 GiB models on one 24 GiB GPU: the second evicts the first once it is idle, then starts."""
    limits = budget(24)
    busy = msnap(g("a", 14, leases=1), g("b", 14, STOPPED), queue="b", **limits)  # type: ignore[arg-type]
    assert decide(busy, 0) == Wait("a finishes its requests first")
    idle = msnap(g("a", 14), g("b", 14, STOPPED), queue="b", **limits)  # type: ignore[arg-type]
    assert decide(idle, 0) == Stop("a")
    gone = msnap(g("a", 14, STOPPED), g("b", 14, STOPPED), queue="b", **limits)  # type: ignore[arg-type]
    assert decide(gone, 0) == Start(on_gpu(0, 14))


# ----- remote models: on another machine, no slot and no memory here -------------------------------

def r(name: str, state: State = READY, leases: int = 0, last_used: float = 0.0) -> ModelView:
    """A model a server elsewhere serves (a `remote` profile, a peer's model)."""
    return ModelView(name, state, leases=leases, last_used=last_used, local=False)


@pytest.mark.parametrize("snapshot, position, expected", [
    pytest.param(snap(m("a"), r("r", STOPPED), queue="r"), 0, Start(), id="a-remote-model-takes-no-slot"),
    pytest.param(snap(m("a", leases=1), r("r", FAILED), queue="r"), 0, Start(),
                 id="a-failed-remote-model-is-checked-again-without-evicting"),
    pytest.param(snap(m("a", STOPPED), r("r", STOPPED), queue="ar"), 1, Start(),
                 id="a-remote-start-does-not-queue-behind-a-local-one"),
    pytest.param(snap(r("r", STARTING), m("b", STOPPED), queue="rb"), 1, Start(),
                 id="a-remote-check-under-way-holds-no-local-start"),
    pytest.param(snap(r("r"), r("s"), m("b", STOPPED), queue="b"), 0, Start(),
                 id="ready-remote-models-hold-no-slot"),
    pytest.param(snap(r("r", last_used=0), m("a", last_used=5), m("b", STOPPED), queue="b"), 0, Stop("a"),
                 id="a-remote-model-is-never-a-victim"),
    pytest.param(snap(m("a", leases=1), m("b", STOPPED), r("r"), queue="br"), 1, Grant(),
                 id="a-swap-under-way-holds-no-remote-request"),
    pytest.param(snap(r("r", leases=2), queue="r", max_concurrent=2), 0,
                 Wait("2 requests are running on the model (proxy.max_concurrent)"),
                 id="max-concurrent-still-applies-to-a-remote-model"),
])
def test_decide_for_remote_models(snapshot: Snapshot, position: int, expected: Decision) -> None:
    assert decide(snapshot, position) == expected


def test_a_remote_model_fits_whatever_the_budgets() -> None:
    snapshot = msnap(g("a", 24, pinned=True), r("r", STOPPED), queue="r", **budget(24, max_loaded=1))  # type: ignore[arg-type]
    assert head(snapshot) is None  # no local model waits: nobody holds the head
    assert eviction_for(snapshot, 0) == Fits()
    assert decide(snapshot, 0) == Start()


# ----- the manager's shortcut when nobody waits ---------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(state=st.sampled_from(list(State)), leases=st.integers(0, 4), unloading=st.booleans(),
       max_concurrent=st.integers(0, 3), others=st.lists(st.sampled_from(list(State)), max_size=3),
       max_loaded=st.integers(1, 3))
def test_grants_at_once_says_what_decide_says_for_a_lone_ticket(
        state: State, leases: int, unloading: bool, max_concurrent: int, others: list[State], max_loaded: int) -> None:
    model = ModelView("a", state, leases=leases if state is READY else 0, unloading=unloading)
    rest = [ModelView(f"o{index}", other) for index, other in enumerate(others)]
    snapshot = Snapshot({view.name: view for view in [model, *rest]}, ("a",), max_loaded, max_concurrent)
    assert grants_at_once(model, max_concurrent) == isinstance(decide(snapshot, 0), Grant)
