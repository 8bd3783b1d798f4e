"""ModelManager rules, with an in-memory process (the process boundary) and a clock the tests advance.

Everything else (the state machine, leases, the queue, deadlines) is the real code.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config, ModelConfig, load_config
from proxy.errors import BackendFailed, BackendTimeout, ClientGone, ModelBusy, UnknownModel
from proxy.housekeeping import start_housekeeping
from proxy.manager import FORCED_STOP_GRACE_S, Lease, ModelEvent, ModelManager, State
from tests.conftest import fake_profile, wait_until, write_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeProcess:
    """Stands in for a backend child: becomes ready when the test says, records stops."""

    _next_pid = 100

    def __init__(self, model: ModelConfig, on_exit: Callable[[Any, int], None], ready: threading.Event,
                 failure: Exception | None) -> None:
        FakeProcess._next_pid += 1
        self.pid = FakeProcess._next_pid
        self.port = 5000 + self.pid
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.headers: dict[str, str] = {}
        self.model = model
        self.on_exit = on_exit
        self.ready = ready
        self.failure = failure
        self.stopped = threading.Event()

    def wait_ready(self, probe: Any = None, timeout_s: float = 600.0) -> float:
        deadline = time.monotonic() + min(timeout_s, 10)
        while not self.ready.wait(0.01):
            if self.stopped.is_set():
                raise BackendFailed(f"{self.model.name}: exited while starting")
            if time.monotonic() > deadline:
                raise BackendTimeout(f"{self.model.name}: not ready")
        if self.failure is not None:
            raise self.failure
        return 0.0

    progress = None

    def stop(self, grace_s: float, successor: ModelConfig | None = None) -> int:
        self.grace_s = grace_s
        self.stopped.set()
        self.successor = successor
        return 0

    def tail(self, lines: int = 20) -> str:
        return "fake output"

    def check_alive(self) -> None:
        pass

    def exit_reason(self, returncode: int) -> str:
        return f"the backend exited unexpectedly (exit status {returncode})"

    def crash(self) -> None:
        self.on_exit(self, -9)


class FakeLauncher:
    """The manager's Launch: records every launch; readiness and failures are scripted per model."""

    def __init__(self) -> None:
        self.launched: list[FakeProcess] = []
        self.gates: dict[str, threading.Event] = {}
        self.failures: dict[str, Exception] = {}
        self.lock = threading.Lock()

    def hold(self, name: str) -> threading.Event:
        """Make the next launches of `name` wait until the returned event is set."""
        self.gates[name] = threading.Event()
        return self.gates[name]

    def __call__(self, model: ModelConfig, on_exit: Callable[[Any, int], None]) -> FakeProcess:
        ready = self.gates.get(model.name)
        if ready is None:
            ready = threading.Event()
            ready.set()
        process = FakeProcess(model, on_exit, ready, self.failures.pop(model.name, None))
        with self.lock:
            self.launched.append(process)
        return process

    def count(self, name: str) -> int:
        return sum(1 for process in self.launched if process.model.name == name)

    def last(self, name: str) -> FakeProcess:
        return [process for process in self.launched if process.model.name == name][-1]


def make_config(tmp_path: Path, max_loaded: int = 1, **profiles: dict[str, Any]) -> Config:
    profiles = profiles or {"alpha": {}, "beta": {}}
    path = write_config(tmp_path, {name: fake_profile(**settings) for name, settings in profiles.items()},
                        proxy={"max_loaded_models": max_loaded, "unload_timer": 60, "queue_timeout": 5})
    return load_config(path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def manager(tmp_path: Path, launcher: FakeLauncher, clock: FakeClock) -> Iterator[ModelManager]:
    manager = ModelManager(make_config(tmp_path), launcher, clock)
    yield manager
    manager.shutdown()


def state(manager: ModelManager, name: str) -> State:
    return State(next(status.state for status in manager.snapshot() if status.name == name))


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run target in a thread; its result or exception lands in the returned dict."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = target()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# ----- leases and idle time ---------------------------------------------------------------------

def test_keep_alive_zero_unloads_when_last_lease_ends(manager: ModelManager, launcher: FakeLauncher) -> None:
    lease = manager.acquire("alpha", keep_alive_s=0, timeout_s=5)
    manager.expire_idle()
    assert state(manager, "alpha") is State.READY  # a lease is still open

    lease.release()
    manager.expire_idle()
    assert state(manager, "alpha") is State.STOPPED
    assert launcher.last("alpha").stopped.is_set()


def test_idle_clock_starts_at_last_release_not_at_grant(manager: ModelManager, clock: FakeClock) -> None:
    first = manager.acquire("alpha", timeout_s=5)
    second = manager.acquire("alpha", timeout_s=5)
    clock.advance(3600)  # a long generation: far past the 60 s timer
    manager.expire_idle()
    assert state(manager, "alpha") is State.READY

    first.release()
    clock.advance(3600)
    manager.expire_idle()
    assert state(manager, "alpha") is State.READY  # the second request still runs

    second.release()
    clock.advance(59)
    assert manager.expire_idle() == pytest.approx(1)
    assert state(manager, "alpha") is State.READY
    clock.advance(1)
    manager.expire_idle()
    assert state(manager, "alpha") is State.STOPPED


def test_negative_keep_alive_never_unloads(manager: ModelManager, clock: FakeClock) -> None:
    manager.acquire("alpha", keep_alive_s=math.inf, timeout_s=5).release()
    clock.advance(10 ** 9)
    assert manager.expire_idle() == math.inf
    assert state(manager, "alpha") is State.READY
    assert next(s for s in manager.snapshot() if s.name == "alpha").expires_at is None


def test_request_without_keep_alive_keeps_the_models_current_duration(manager: ModelManager, clock: FakeClock) -> None:
    manager.acquire("alpha", keep_alive_s=10, timeout_s=5).release()
    manager.acquire("alpha", keep_alive_s=None, timeout_s=5).release()
    clock.advance(10)
    manager.expire_idle()
    assert state(manager, "alpha") is State.STOPPED


def test_last_keep_alive_wins_and_a_reload_starts_from_the_default(manager: ModelManager, clock: FakeClock) -> None:
    manager.acquire("alpha", keep_alive_s=math.inf, timeout_s=5).release()
    manager.acquire("alpha", keep_alive_s=5, timeout_s=5).release()
    clock.advance(5)
    manager.expire_idle()
    assert state(manager, "alpha") is State.STOPPED

    manager.acquire("alpha", timeout_s=5).release()  # reloaded: back to the configured 60 s
    clock.advance(59)
    manager.expire_idle()
    assert state(manager, "alpha") is State.READY
    clock.advance(1)
    manager.expire_idle()
    assert state(manager, "alpha") is State.STOPPED


def test_profile_unload_timer_overrides_the_proxy_default(tmp_path: Path, launcher: FakeLauncher,
                                                          clock: FakeClock) -> None:
    manager = ModelManager(make_config(tmp_path, alpha={"unload_timer": "2s"}, beta={}), launcher, clock)
    try:
        manager.acquire("alpha", timeout_s=5).release()
        clock.advance(2)
        manager.expire_idle()
        assert state(manager, "alpha") is State.STOPPED
    finally:
        manager.shutdown()


def test_release_is_idempotent(manager: ModelManager, clock: FakeClock) -> None:
    kept = manager.acquire("alpha", timeout_s=5)
    lease = manager.acquire("alpha", timeout_s=5)
    lease.release()
    lease.release()
    assert next(s for s in manager.snapshot() if s.name == "alpha").leases == 1
    kept.release()


def test_unknown_model(manager: ModelManager) -> None:
    with pytest.raises(UnknownModel):
        manager.acquire("gamma", timeout_s=1)


# ----- starting -----------------------------------------------------------------------------------

def test_concurrent_first_requests_share_one_launch(manager: ModelManager, launcher: FakeLauncher) -> None:
    gate = launcher.hold("alpha")
    runs = [in_thread(lambda: manager.acquire("alpha", timeout_s=5)) for _ in range(5)]
    wait_until(lambda: launcher.count("alpha") == 1 and sum(s.queued for s in manager.snapshot()) == 5)
    assert state(manager, "alpha") is State.STARTING
    gate.set()
    for thread, outcome in runs:
        thread.join(5)
        assert isinstance(outcome.get("result"), Lease), outcome
    assert launcher.count("alpha") == 1


def test_failed_start_fails_every_waiter_and_the_next_request_retries(manager: ModelManager,
                                                                     launcher: FakeLauncher) -> None:
    gate = launcher.hold("alpha")
    launcher.failures["alpha"] = BackendFailed("alpha: the backend exited with code 1 while starting")
    runs = [in_thread(lambda: manager.acquire("alpha", timeout_s=5)) for _ in range(3)]
    wait_until(lambda: sum(s.queued for s in manager.snapshot()) == 3)
    gate.set()
    for thread, outcome in runs:
        thread.join(5)
        assert isinstance(outcome.get("error"), BackendFailed), outcome
        assert "code 1" in outcome["error"].message
    status = next(s for s in manager.snapshot() if s.name == "alpha")
    assert status.state == "failed" and "code 1" in (status.last_error or "")
    assert launcher.last("alpha").stopped.is_set()

    manager.acquire("alpha", timeout_s=5).release()  # the next request tries again
    assert launcher.count("alpha") == 2
    assert state(manager, "alpha") is State.READY


def test_crash_while_ready_stops_and_next_request_restarts(manager: ModelManager, launcher: FakeLauncher) -> None:
    lease = manager.acquire("alpha", timeout_s=5)
    launcher.last("alpha").crash()
    status = next(s for s in manager.snapshot() if s.name == "alpha")
    assert status.state == "stopped" and status.leases == 0 and "unexpectedly" in (status.last_error or "")
    lease.release()  # the in-flight request ends after the crash: ignored, never negative
    assert next(s for s in manager.snapshot() if s.name == "alpha").leases == 0

    manager.acquire("alpha", timeout_s=5).release()
    assert launcher.count("alpha") == 2


def test_exit_reported_for_a_stopped_generation_is_ignored(manager: ModelManager, launcher: FakeLauncher) -> None:
    manager.acquire("alpha", keep_alive_s=0, timeout_s=5).release()
    manager.expire_idle()
    old = launcher.last("alpha")
    manager.acquire("alpha", timeout_s=5).release()
    old.crash()  # the old child's exit arrives late
    assert state(manager, "alpha") is State.READY


# ----- swapping -----------------------------------------------------------------------------------

def test_swap_waits_for_the_running_request(manager: ModelManager, launcher: FakeLauncher) -> None:
    lease_a = manager.acquire("alpha", timeout_s=5)
    thread, outcome = in_thread(lambda: manager.acquire("beta", timeout_s=5))
    time.sleep(0.2)
    assert state(manager, "alpha") is State.READY  # busy: never killed for a swap
    assert not launcher.last("alpha").stopped.is_set()
    assert launcher.count("beta") == 0

    lease_a.release()
    thread.join(5)
    assert isinstance(outcome.get("result"), Lease)
    assert launcher.last("alpha").stopped.is_set()
    assert state(manager, "alpha") is State.STOPPED
    assert state(manager, "beta") is State.READY


def test_pending_swap_is_not_starved_by_new_requests_for_the_old_model(manager: ModelManager,
                                                                       launcher: FakeLauncher) -> None:
    lease_a = manager.acquire("alpha", timeout_s=5)
    swap, swap_outcome = in_thread(lambda: manager.acquire("beta", timeout_s=5))
    wait_until(lambda: any(s.name == "beta" and s.queued for s in manager.snapshot()))
    late, late_outcome = in_thread(lambda: manager.acquire("alpha", timeout_s=5))
    time.sleep(0.2)
    assert "result" not in late_outcome  # queued behind the swap, FIFO

    lease_a.release()
    swap.join(5)
    lease_b = swap_outcome["result"]
    time.sleep(0.1)
    assert "result" not in late_outcome  # beta is busy now; alpha waits for it
    lease_b.release()
    late.join(5)
    assert isinstance(late_outcome.get("result"), Lease)
    assert launcher.count("alpha") == 2 and state(manager, "beta") is State.STOPPED


def test_requests_queued_before_a_swap_are_served_first(manager: ModelManager, launcher: FakeLauncher) -> None:
    gate = launcher.hold("alpha")
    first, first_outcome = in_thread(lambda: manager.acquire("alpha", timeout_s=5))
    wait_until(lambda: launcher.count("alpha") == 1)
    swap, swap_outcome = in_thread(lambda: manager.acquire("beta", timeout_s=5))
    wait_until(lambda: sum(s.queued for s in manager.snapshot()) == 2)
    gate.set()  # alpha becomes ready: its waiter, who came first, must get it before the swap
    first.join(5)
    assert isinstance(first_outcome.get("result"), Lease)
    assert "result" not in swap_outcome
    first_outcome["result"].release()
    swap.join(5)
    assert isinstance(swap_outcome.get("result"), Lease)


def test_wait_timeout_is_model_busy_with_retry_after(manager: ModelManager) -> None:
    lease = manager.acquire("alpha", timeout_s=5)
    started = time.monotonic()
    with pytest.raises(ModelBusy) as caught:
        manager.acquire("beta", timeout_s=0.3)
    assert 0.3 <= time.monotonic() - started < 2
    assert "Retry-After" in caught.value.headers()
    lease.release()
    # the abandoned swap left nothing behind: alpha serves again at once
    manager.acquire("alpha", timeout_s=1).release()


def test_lru_idle_model_is_evicted_when_slots_are_full(tmp_path: Path, launcher: FakeLauncher,
                                                       clock: FakeClock) -> None:
    manager = ModelManager(make_config(tmp_path, max_loaded=2, a={}, b={}, c={}), launcher, clock)
    try:
        manager.acquire("a", timeout_s=5).release()
        clock.advance(1)
        manager.acquire("b", timeout_s=5).release()
        clock.advance(1)
        manager.acquire("a", timeout_s=5).release()  # b is now the least recently used
        manager.acquire("c", timeout_s=5).release()
        assert [state(manager, name) for name in "abc"] == [State.READY, State.STOPPED, State.READY]
    finally:
        manager.shutdown()


def test_busy_models_drain_before_eviction(tmp_path: Path, launcher: FakeLauncher, clock: FakeClock) -> None:
    manager = ModelManager(make_config(tmp_path, max_loaded=2, a={}, b={}, c={}), launcher, clock)
    try:
        lease_a = manager.acquire("a", timeout_s=5)
        clock.advance(1)
        lease_b = manager.acquire("b", timeout_s=5)
        thread, outcome = in_thread(lambda: manager.acquire("c", timeout_s=5))
        time.sleep(0.2)
        assert "result" not in outcome and launcher.count("c") == 0
        lease_b.release()  # b is idle now: it goes, although a is older
        thread.join(5)
        assert isinstance(outcome.get("result"), Lease)
        assert state(manager, "a") is State.READY and state(manager, "b") is State.STOPPED
        lease_a.release()
    finally:
        manager.shutdown()


# ----- unloading ----------------------------------------------------------------------------------

def test_unload_waits_for_requests_unless_forced(manager: ModelManager, launcher: FakeLauncher) -> None:
    lease = manager.acquire("alpha", timeout_s=5)
    with pytest.raises(ModelBusy):
        manager.unload("alpha", timeout_s=0.2)
    assert state(manager, "alpha") is State.READY

    thread, outcome = in_thread(lambda: manager.unload("alpha", timeout_s=5))
    time.sleep(0.1)
    assert "result" not in outcome
    lease.release()
    thread.join(5)
    assert outcome["result"] == ["alpha"]
    assert state(manager, "alpha") is State.STOPPED

    lease = manager.acquire("alpha", timeout_s=5)
    assert manager.unload(None, force=True, timeout_s=1) == ["alpha"]
    assert launcher.last("alpha").stopped.is_set()
    lease.release()  # after a forced unload: ignored
    assert next(s for s in manager.snapshot() if s.name == "alpha").leases == 0


def test_forced_unload_stops_with_a_short_grace_and_a_plain_one_with_stop_grace(
        manager: ModelManager, launcher: FakeLauncher) -> None:
    stop_grace_s = manager.config.proxy.stop_grace_s
    assert stop_grace_s > FORCED_STOP_GRACE_S  # the test config's 3 s
    lease = manager.acquire("alpha", timeout_s=5)
    assert manager.unload("alpha", force=True) == ["alpha"]
    assert launcher.last("alpha").grace_s == FORCED_STOP_GRACE_S
    lease.release()

    manager.acquire("alpha", timeout_s=5).release()
    assert manager.unload("alpha") == ["alpha"]
    assert launcher.last("alpha").grace_s == stop_grace_s


def test_unload_of_a_stopped_model_reports_nothing(manager: ModelManager) -> None:
    assert manager.unload("alpha", timeout_s=1) == []


def test_shutdown_stops_children_and_refuses_waiters(manager: ModelManager, launcher: FakeLauncher) -> None:
    manager.acquire("alpha", timeout_s=5)  # still held at shutdown
    thread, outcome = in_thread(lambda: manager.acquire("beta", timeout_s=5))
    time.sleep(0.1)
    manager.shutdown()
    thread.join(5)
    assert isinstance(outcome.get("error"), ModelBusy)
    assert launcher.last("alpha").stopped.is_set()


def test_shutdown_during_a_start_stops_the_new_child(manager: ModelManager, launcher: FakeLauncher) -> None:
    launcher.hold("alpha")
    thread, outcome = in_thread(lambda: manager.acquire("alpha", timeout_s=5))
    wait_until(lambda: launcher.count("alpha") == 1)
    manager.shutdown()
    thread.join(5)
    assert "error" in outcome
    assert launcher.last("alpha").stopped.is_set()


def test_reaper_thread_unloads_on_time(tmp_path: Path, launcher: FakeLauncher) -> None:
    manager = ModelManager(make_config(tmp_path, alpha={"unload_timer": 0.3}), launcher)
    start_housekeeping(manager)
    try:
        manager.acquire("alpha", timeout_s=5).release()
        released = time.monotonic()
        wait_until(lambda: state(manager, "alpha") is State.STOPPED, timeout_s=3)
        assert 0.25 <= time.monotonic() - released < 1.0
    finally:
        manager.shutdown()


# ----- reloading ----------------------------------------------------------------------------------

def test_reload_keeps_unchanged_models_and_restarts_changed_ones_after_their_requests(
        tmp_path: Path, launcher: FakeLauncher, clock: FakeClock) -> None:
    manager = ModelManager(make_config(tmp_path, max_loaded=3, keep={}, change={}, drop={}), launcher, clock)
    try:
        for name in ("keep", "change", "drop"):
            manager.acquire(name, timeout_s=5).release()
        busy = manager.acquire("change", timeout_s=5)
        shutil.rmtree(tmp_path / "model_configs")  # the same files, edited: drop removed, one changed
        new = make_config(tmp_path, max_loaded=3, keep={}, change={"unload_timer": 7}, added={})

        restart = manager.reload(new)
        assert sorted(restart) == ["change", "drop"]
        assert state(manager, "keep") is State.READY and launcher.count("keep") == 1
        with pytest.raises(UnknownModel):
            manager.acquire("drop", timeout_s=1)

        thread, outcome = in_thread(lambda: manager.unload("change", timeout_s=5))
        time.sleep(0.1)
        assert "result" not in outcome  # the running request finishes on the old profile first
        busy.release()
        thread.join(5)
        assert outcome["result"] == ["change"]
        manager.unload("drop", timeout_s=5)
        assert "drop" not in {status.name for status in manager.snapshot()}

        manager.acquire("change", timeout_s=5).release()
        assert launcher.last("change").model.unload_timer_s == 7  # the new profile applies
        assert manager.config is new
        manager.acquire("added", timeout_s=5).release()
        assert state(manager, "added") is State.READY
    finally:
        manager.shutdown()


def test_a_model_loaded_for_nobody_still_unloads_on_time(manager: ModelManager, launcher: FakeLauncher,
                                                         clock: FakeClock) -> None:
    gate = launcher.hold("alpha")
    left = threading.Event()
    thread, outcome = in_thread(lambda: manager.acquire("alpha", timeout_s=5, cancelled=left.is_set))
    wait_until(lambda: launcher.count("alpha") == 1)
    left.set()  # the client goes away while its model loads
    gate.set()
    thread.join(5)
    assert isinstance(outcome.get("error"), ClientGone)
    assert state(manager, "alpha") is State.READY
    clock.advance(60)
    manager.expire_idle()
    assert state(manager, "alpha") is State.STOPPED


def test_unload_when_idle_waits_for_the_running_request(manager: ModelManager, clock: FakeClock) -> None:
    assert manager.unload_when_idle("alpha") is False  # not loaded: nothing to do
    lease = manager.acquire("alpha", keep_alive_s=math.inf, timeout_s=5)
    assert manager.unload_when_idle("alpha") is True
    manager.expire_idle()
    assert state(manager, "alpha") is State.READY
    lease.release()
    manager.expire_idle()
    assert state(manager, "alpha") is State.STOPPED


def test_max_concurrent_admits_the_next_request_as_soon_as_one_ends(tmp_path: Path, launcher: FakeLauncher,
                                                                    clock: FakeClock) -> None:
    config = load_config(write_config(tmp_path, {"alpha": fake_profile()},
                                      proxy={"max_concurrent": 2, "queue_timeout": 5}))
    manager = ModelManager(config, launcher, clock)
    try:
        first = manager.acquire("alpha", timeout_s=5)
        manager.acquire("alpha", timeout_s=5)
        thread, outcome = in_thread(lambda: manager.acquire("alpha", timeout_s=5))
        time.sleep(0.1)
        assert "result" not in outcome  # two at once: the third waits its turn
        released = time.monotonic()
        first.release()
        thread.join(5)
        assert isinstance(outcome.get("result"), Lease)
        assert time.monotonic() - released < 0.2  # woken by the release, not by a poll
    finally:
        manager.shutdown()


# ----- state events -------------------------------------------------------------------------------

def test_every_transition_reaches_the_listener_in_order(tmp_path: Path, launcher: FakeLauncher,
                                                       clock: FakeClock) -> None:
    events: list[ModelEvent] = []
    manager = ModelManager(make_config(tmp_path), launcher, clock, on_event=events.append)
    try:
        manager.acquire("alpha", timeout_s=5).release()
        manager.acquire("beta", timeout_s=5).release()
        assert [(event.model, event.previous, event.state) for event in events] == [
            ("alpha", State.STOPPED, State.STARTING), ("alpha", State.STARTING, State.READY),
            ("alpha", State.READY, State.STOPPING), ("alpha", State.STOPPING, State.STOPPED),
            ("beta", State.STOPPED, State.STARTING), ("beta", State.STARTING, State.READY),
        ]
        assert events[2].reason == "swap to beta: the least recently used idle model; proxy.max_loaded_models (1) reached"
    finally:
        manager.shutdown()


def test_a_failing_listener_never_breaks_the_manager(tmp_path: Path, launcher: FakeLauncher,
                                                    clock: FakeClock) -> None:
    def broken(event: ModelEvent) -> None:
        raise RuntimeError("the listener is broken")

    manager = ModelManager(make_config(tmp_path), launcher, clock, on_event=broken)
    try:
        manager.acquire("alpha", timeout_s=5).release()
        assert state(manager, "alpha") is State.READY
        assert manager.unload("alpha", timeout_s=5) == ["alpha"]
        assert state(manager, "alpha") is State.STOPPED
    finally:
        manager.shutdown()


def test_an_illegal_transition_is_refused_as_a_bug(manager: ModelManager) -> None:
    record = manager._models["alpha"]  # the test reaches in: no public path makes this transition
    with pytest.raises(AssertionError, match="stopped -> ready is not an allowed transition"):
        with manager._cond:
            manager._set_state(record, State.READY)
    assert state(manager, "alpha") is State.STOPPED
