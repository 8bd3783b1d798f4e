"""ModelManager: every model's state, the leases requests hold, the FIFO swap queue, idle deadlines.

The only writer of model state. One Condition guards every mutable field; slow work (spawning,
readiness, stopping) happens outside it, by the thread that claimed the transition. What to
start, evict or grant is decided by the pure policy in proxy/scheduling.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from proxy import scheduling
from proxy.config import Config, ModelConfig
from proxy.errors import BackendFailed, ClientGone, InsufficientMemory, ModelBusy, ProxyError, UnknownModel
from proxy.footprints import Memory, is_out_of_memory
from proxy.launcher import Backend, Launch
from proxy.memory import NOTHING, Need, Placement, devices_of, format_placement
from proxy.records import Cancelled as Cancelled  # re-exported: the manager's contract
from proxy.records import Lease as Lease
from proxy.records import Listener as Listener
from proxy.records import ModelEvent as ModelEvent
from proxy.records import ModelRecord, Ticket, never_if_unrepresentable
from proxy.records import ModelStatus as ModelStatus  # re-exported: /status's entries are the manager's answer
from proxy.scheduling import LOADED, TRANSITIONS
from proxy.scheduling import State as State  # re-exported: the states are part of the manager's contract
from proxy.supervisor import describe_exit

log = logging.getLogger(__name__)

Clock = Callable[[], float]
CANCEL_POLL_S = 0.5
FORCED_STOP_GRACE_S = 1.0  # SIGTERM to SIGKILL for /unload?force=true (at most proxy.stop_grace)


class Wakeups:
    """Events the manager sets for its background threads: an idle deadline moved, preloads are due."""

    def __init__(self) -> None:
        self.reaper = threading.Event()   # a lease was released, a model became ready or must unload
        self.preload = threading.Event()  # start-up, a reload, a preloaded model crashed, shutdown


class ModelManager:
    def __init__(self, config: Config, launch: Launch, clock: Clock = time.monotonic,
                 on_event: Listener | None = None, memory: Memory | None = None) -> None:
        self._config = config
        self._launch = launch
        self._clock = clock
        self._listeners: list[Listener] = [on_event] if on_event is not None else []  # see listen()
        self.memory = memory or Memory()
        self._budgets = self.memory.budgets(config)  # guarded by _cond; raises ConfigError (proxy.gpus: auto)
        self._needs(config, self._budgets)
        self._cond = threading.Condition()
        self._models = {  # guarded by _cond
            name: ModelRecord(model, never_if_unrepresentable(config.idle_timeout_s(model)))
            for name, model in config.models.items()
        }
        self._queue: list[Ticket] = []  # guarded by _cond
        self._closed = False             # guarded by _cond
        self._draining = False           # guarded by _cond: shutting down, running requests may finish
        self._starting_threads = 0       # guarded by _cond: starts whose process may be unpublished
        self.wakeups = Wakeups()  # the background threads' (proxy/housekeeping.py): they only ask

    # ----- requests ---------------------------------------------------------------------------

    def acquire(self, name: str, keep_alive_s: float | None = None, timeout_s: float | None = None,
                cancelled: Cancelled | None = None) -> Lease:
        """Return a lease on a ready model, starting or swapping it in as needed.

        Blocks up to timeout_s (default proxy.queue_timeout) and then raises ModelBusy. Raises
        BackendFailed/BackendTimeout when the start this request waited for failed, and
        ClientGone when `cancelled` says the client left while waiting (it leaves the queue, so
        nothing is loaded for it). keep_alive_s None keeps the model's current idle duration.
        """
        ticket = Ticket(name, keep_alive_s, cancelled)
        with self._cond:
            runtime = self._runtime(name)
            if self._closed or self._draining:
                raise ModelBusy("the proxy is shutting down", retry_after_s=10)
            # Nobody waits: the policy's answer for this one model (a grant, in the common case)
            # without a snapshot of every model.
            if (not self._queue and scheduling.grants_at_once(runtime.view(NOTHING), self._config.proxy.max_concurrent)
                    and not (cancelled is not None and cancelled())):
                return self._grant(runtime, ticket)
            if len(self._queue) >= self._config.proxy.max_queue:
                raise ModelBusy(f"server busy, please try again: {len(self._queue)} requests are waiting "
                                "(proxy.max_queue)", retry_after_s=2)
            wait_s = self._config.proxy.queue_timeout_s if timeout_s is None else timeout_s
            self._queue.append(ticket)
        started = time.monotonic()
        deadline = started + wait_s  # waits use real time; the clock is for idle deadlines
        try:
            while True:
                with self._cond:
                    step = self._next_step(ticket, deadline, wait_s)
                if isinstance(step, Lease):
                    step.waited_s = time.monotonic() - started
                    step.loaded = ticket.attempt_seen is not None
                    return step
                step()  # a start or a stop this thread claimed; runs without the lock
        finally:
            with self._cond:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def _next_step(self, ticket: Ticket, deadline: float, wait_s: float) -> Lease | Callable[[], None]:
        """Under the lock: grant a lease, claim a transition to run, or wait. Raises on failure."""
        while True:
            if self._closed or self._draining:
                raise ModelBusy("the proxy is shutting down", retry_after_s=10)
            if ticket.cancelled is not None and ticket.cancelled():
                raise ClientGone(f"{ticket.name}: the client closed the connection while waiting")
            runtime = self._runtime(ticket.name)
            state = runtime.state
            if state is State.STARTING:
                ticket.attempt_seen = runtime.attempt  # join this start; its failure is ours
            elif state is State.FAILED and ticket.attempt_seen == runtime.failed_attempt:
                raise runtime.failure_type(runtime.last_error or f"{ticket.name}: failed to start")
            decision = scheduling.decide(self._scheduling_snapshot(), self._queue.index(ticket))
            if isinstance(decision, scheduling.Grant):
                return self._grant(runtime, ticket)
            if isinstance(decision, scheduling.Start):
                return self._claim_start(runtime, ticket, decision.placement)
            if isinstance(decision, scheduling.Stop):
                why = f": {decision.why}" if decision.why else ""
                return self._claim_stop(self._models[decision.victim], reason=f"swap to {runtime.model.name}{why}",
                                        successor=runtime.model, cause=decision.cause)
            if isinstance(decision, scheduling.Refuse):
                raise InsufficientMemory(decision.reason)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ModelBusy(
                    f"{ticket.name}: not available within {wait_s:g}s (the model is {runtime.state.value}"
                    f"{', waiting for another model to finish its requests' if state is not State.STARTING else ''}); "
                    "try again later"
                )
            if ticket.cancelled is not None:
                remaining = min(remaining, CANCEL_POLL_S)  # a disconnect wakes nobody: look again soon
            self._cond.wait(remaining)

    def _scheduling_snapshot(self) -> scheduling.Snapshot:
        """Under the lock: what the policy decides on (models in configuration order, the queue oldest first)."""
        counted = bool(self._budgets)  # without budgets, footprints are not looked up at all
        return scheduling.Snapshot(
            models={name: runtime.view(self._need(runtime.model) if counted else NOTHING)
                    for name, runtime in self._models.items()},
            queue=tuple(ticket.name for ticket in self._queue),
            max_loaded_models=self._config.proxy.max_loaded_models,
            max_concurrent=self._config.proxy.max_concurrent,
            budgets=self._budgets,
        )

    def _need(self, model: ModelConfig) -> Need:
        """A model's footprint: a lookup (estimated ahead by _needs, outside the lock, when memory is counted)."""
        return self.memory.need(model, self._config, estimate=bool(self._budgets))

    def _needs(self, config: Config, budgets: dict[str, int]) -> None:
        """Estimate every profile's footprint now, outside the lock (it reads the model's files), if it counts."""
        if budgets:
            for model in config.models.values():
                self.memory.need(model, config)

    def _runtime(self, name: str) -> ModelRecord:
        runtime = self._models.get(name)
        if runtime is None or runtime.removed:
            raise UnknownModel(f"model {name!r} is not configured")
        return runtime

    def _grant(self, runtime: ModelRecord, ticket: Ticket) -> Lease:
        assert runtime.process is not None
        runtime.leases += 1
        runtime.requests_served += 1
        runtime.last_used = self._clock()
        runtime.deadline = math.inf
        if ticket.keep_alive_s is not None:  # the last request that sent one wins (Ollama)
            runtime.keep_alive_s = never_if_unrepresentable(ticket.keep_alive_s)
        return Lease(runtime.model, runtime.process, functools.partial(self._release, runtime, runtime.generation))

    def _release(self, runtime: ModelRecord, generation: int) -> None:
        with self._cond:
            if generation != runtime.generation:
                return  # the process this lease was for has gone (crash, force unload)
            runtime.leases -= 1
            runtime.last_used = self._clock()
            if runtime.leases == 0:  # the idle clock starts only now
                runtime.deadline = runtime.last_used + runtime.keep_alive_s
                self.wakeups.reaper.set()
            self._cond.notify_all()  # a queued swap, an unload, or a request waiting for room may proceed

    # ----- claiming transitions (under the lock) ----------------------------------------------

    def _claim_start(self, runtime: ModelRecord, ticket: Ticket | None, placement: Placement) -> Callable[[], None]:
        self._adopt_replacement(runtime)
        runtime.generation += 1
        runtime.attempt += 1
        if ticket is not None:
            ticket.attempt_seen = runtime.attempt
        runtime.keep_alive_s = runtime.default_keep_alive_s
        runtime.holds = dict(placement)
        runtime.starting_since = time.monotonic()
        self._set_state(runtime, State.STARTING, reason=f"placed: {format_placement(placement)}" if placement else "")
        self._starting_threads += 1
        generation = runtime.generation
        return lambda: self._start(runtime, generation, placement)

    def _claim_stop(self, runtime: ModelRecord, reason: str, successor: ModelConfig | None = None,
                    grace_s: float | None = None, cause: str = "requested") -> Callable[[], None]:
        process = runtime.process
        runtime.generation += 1
        runtime.leases = 0
        generation = runtime.generation
        self._set_state(runtime, State.STOPPING, reason=reason, cause=cause)
        grace_s = self._config.proxy.stop_grace_s if grace_s is None else grace_s
        return lambda: self._stop(runtime, process, generation, successor, grace_s)

    def _set_state(self, runtime: ModelRecord, state: State, reason: str = "", cause: str = "") -> None:
        """Commit a transition (under the lock): the one place that logs it and tells the listener."""
        previous = runtime.state
        if state not in TRANSITIONS[previous]:
            raise AssertionError(f"model {runtime.model.name}: {previous.value} -> {state.value} is not an "
                                 "allowed transition (a bug in the manager)")
        runtime.state = state
        if state not in LOADED:
            runtime.holds = {}
        level = logging.ERROR if state is State.FAILED else logging.INFO
        log.log(level, "model %s: %s -> %s%s", runtime.model.name, previous.value, state.value,
                f" ({reason})" if reason else "")
        if self._listeners:
            event = ModelEvent(runtime.model.name, previous, state, reason, cause)
            for listener in self._listeners:
                try:
                    listener(event)
                except Exception:  # an observer must never break the manager
                    log.exception("model %s: the event listener failed", runtime.model.name)

    # ----- transitions (outside the lock) -------------------------------------------------------

    def _start(self, runtime: ModelRecord, generation: int, placement: Placement) -> None:
        model = runtime.model
        started = time.monotonic()
        if not self.memory.wait_for_free(placement):
            log.warning("model %s: starting although NVML does not show %s free yet", model.name,
                        format_placement(placement))
        devices = devices_of(placement)
        placed = dataclasses.replace(model, devices=devices) if devices else model
        process: Backend | None = None
        published = False
        retried = False
        while True:
            try:
                process = self._launch(placed, lambda _process, code: self._on_exit(runtime, generation, code))
                stale = self._publish(runtime, generation, process)
                published = True
                if stale:
                    raise BackendFailed(f"{model.name}: unloaded while starting")
                process.wait_ready(timeout_s=self._config.startup_timeout_s(model))
            except Exception as exc:  # any failure must leave STARTING, or the model is stuck there
                if not retried and self._retry_after_out_of_memory(runtime, generation, exc, process, published):
                    retried, process, published = True, None, False
                    continue
                self._fail_start(runtime, model, generation, exc, process, published, retried)
                return
            break
        if self._become_ready(runtime, generation, started):
            process.stop(self._config.proxy.stop_grace_s)
            return
        measured = self.memory.measure(model, process.pid) if process.pid is not None else {}
        if measured:
            with self._cond:
                if generation == runtime.generation:
                    runtime.holds.update(measured)  # what it really takes, from now on

    def _retry_after_out_of_memory(self, runtime: ModelRecord, generation: int, exc: Exception,
                                   process: Backend | None, published: bool) -> bool:
        """After a load that ran out of memory: stop it, evict every other idle unpinned model, and say to retry.

        Returns False (nothing done) for any other failure, or when the start was unloaded meanwhile.
        """
        output = process.tail(20) if process is not None else ""
        if not is_out_of_memory(f"{output}\n{getattr(exc, 'detail', '') or ''}\n{exc}"):
            return False
        if process is not None:
            process.stop(self._config.proxy.stop_grace_s)
        with self._cond:
            if generation != runtime.generation:
                return False
            if published:
                self._starting_threads += 1  # the retry publishes again
                runtime.process = None
            holds = dict(runtime.holds)
            idle = [other for other in self._models.values() if other is not runtime and other.state is State.READY
                    and other.leases == 0 and not other.model.pinned and other.model.runs_here]
            steps = [self._claim_stop(other, reason=f"{runtime.model.name} ran out of memory while loading; "
                                                    "unloading every idle model and trying once more", cause="evicted")
                     for other in idle]
        log.warning("model %s: out of memory while loading; %s, then trying once more", runtime.model.name,
                    f"unloading {', '.join(other.model.name for other in idle)}" if idle else "no idle model to unload")
        for step in steps:
            step()
        self.memory.wait_for_free(holds)
        return True

    def _publish(self, runtime: ModelRecord, generation: int, process: Backend) -> bool:
        """Make a spawned process the model's, unless it was unloaded meanwhile; return whether it was (stale)."""
        with self._cond:
            self._starting_threads -= 1
            stale = generation != runtime.generation
            if not stale:
                runtime.process = process
            self._cond.notify_all()
        return stale

    def _fail_start(self, runtime: ModelRecord, model: ModelConfig, generation: int, exc: Exception,
                    process: Backend | None, published: bool, after_oom: bool = False) -> None:
        """Stop what a failed start left and fail its waiters. Called while `exc` is being handled."""
        if not isinstance(exc, ProxyError):
            log.exception("model %s: unexpected error while starting", model.name)
        error = exc if isinstance(exc, ProxyError) else BackendFailed(
            f"{model.name}: cannot start ({type(exc).__name__}); see the proxy's log", detail=str(exc))
        if after_oom or is_out_of_memory(f"{error.detail or ''}\n{error.message}"):
            error = InsufficientMemory(
                f"{model.name}: the backend ran out of memory while loading"
                f"{', again after every idle model was unloaded' if after_oom else ''}"
                f" (it was counted as {format_placement(runtime.holds)}); declare a larger footprint or free memory",
                detail=error.detail)
        if process is not None:
            process.stop(self._config.proxy.stop_grace_s)
        with self._cond:
            if not published:
                self._starting_threads -= 1
            if generation == runtime.generation:
                runtime.process = None
                runtime.last_error = error.message
                runtime.last_output = error.detail
                runtime.failure_type = type(error)
                runtime.failed_attempt = runtime.attempt
                self._set_state(runtime, State.FAILED, reason=str(error))  # the log gets the detail
                self._adopt_replacement(runtime)
            self._cond.notify_all()

    def _become_ready(self, runtime: ModelRecord, generation: int, started: float) -> bool:
        """Make a model that passed its readiness check READY; return True if it was unloaded meanwhile."""
        with self._cond:
            stale = generation != runtime.generation
            if not stale:
                runtime.last_error = None
                runtime.last_output = None
                runtime.ready_since = time.time()
                if runtime.starting_since is not None:
                    runtime.last_load_s = time.monotonic() - runtime.starting_since
                # The idle clock runs until a waiter takes its lease, so a model loaded for
                # clients that all left still unloads on time.
                runtime.deadline = self._clock() + runtime.keep_alive_s
                self.wakeups.reaper.set()
                self._set_state(runtime, State.READY, reason=f"in {time.monotonic() - started:.2f}s")
            self._cond.notify_all()
        return stale

    def _stop(self, runtime: ModelRecord, process: Backend | None, generation: int,
              successor: ModelConfig | None, grace_s: float) -> None:
        reason = ""
        try:
            if process is not None:
                # The successor lets a resident TabbyAPI swap in place instead of restarting.
                returncode = process.stop(grace_s, successor)
                reason = f"pid {process.pid}: {describe_exit(returncode)}" if process.pid is not None else ""
        except Exception:  # the slot must not stay STOPPING forever; the error is in the log
            log.exception("model %s: error while stopping pid %s", runtime.model.name, process and process.pid)
        with self._cond:
            if generation == runtime.generation:
                runtime.process = None
                runtime.ready_since = None
                self._set_state(runtime, State.STOPPED, reason=reason)
                self._adopt_replacement(runtime)
            self._cond.notify_all()

    def _on_exit(self, runtime: ModelRecord, generation: int, returncode: int) -> None:
        """Called by the supervisor when a child exits; only acts on an unexpected exit while ready."""
        with self._cond:
            if generation != runtime.generation or runtime.state is not State.READY:
                return  # a stop we asked for, or a start that will report its own failure
            process = runtime.process
            tail = process.tail(10) if process is not None else ""
            why = (process.exit_reason(returncode) if process is not None
                   else f"the backend exited unexpectedly (exit status {returncode})")
            runtime.generation += 1
            runtime.leases = 0
            runtime.process = None
            runtime.ready_since = None
            runtime.last_error = f"{runtime.model.name}: {why}"
            runtime.last_output = f"last output:\n{tail}" if tail else None
            log.error("model %s: %s%s", runtime.model.name, why, f"; last output:\n{tail}" if tail else "")
            self._set_state(runtime, State.STOPPED, reason="crashed" if process is None or process.pid is not None
                            else "unreachable", cause="crashed")
            self._adopt_replacement(runtime)
            self._cond.notify_all()
            if runtime.model.name in self._config.proxy.preload:
                self.wakeups.preload.set()

    # ----- unloading ----------------------------------------------------------------------------

    def expire_idle(self) -> float:
        """Stop every model idle past its deadline; return seconds until the next deadline (inf: none).

        Safe to call any time: everything is re-checked under the lock.
        """
        while True:
            with self._cond:
                now = self._clock()
                due = [runtime for runtime in self._models.values()
                       if runtime.state is State.READY and runtime.leases == 0 and runtime.deadline <= now]
                if not due:
                    upcoming = [runtime.deadline for runtime in self._models.values()
                                if runtime.state is State.READY and runtime.leases == 0]
                    return max(0.0, min(upcoming, default=math.inf) - now)
                runtime = due[0]
                reason = "keep_alive=0" if runtime.keep_alive_s == 0 else "idle"
                step = self._claim_stop(runtime, reason=reason, cause="keep_alive_0" if reason != "idle" else "idle")
            step()

    def unload_when_idle(self, name: str) -> bool:
        """Set a model's keep_alive to 0 so it stops once no request uses it; return whether it was loaded.

        Does not wait (Ollama's empty request with keep_alive 0). Raises UnknownModel.
        """
        with self._cond:
            runtime = self._runtime(name)
            if runtime.state not in (State.STARTING, State.READY):
                return False
            runtime.keep_alive_s = 0.0
            if runtime.state is State.READY and runtime.leases == 0:
                runtime.deadline = self._clock()
            self.wakeups.reaper.set()
            return True

    def unload(self, name: str | None = None, *, force: bool = False, timeout_s: float | None = None,
               cause: str = "requested") -> list[str]:
        """Stop one model (or all); wait for their requests to finish unless force. Return those stopped.

        `cause` says why for the event listener: requested (an admin) or reload.

        Raises ModelBusy when requests are still running after timeout_s.
        """
        stopped: list[str] = []
        with self._cond:
            if name is not None and name not in self._models:
                raise UnknownModel(f"model {name!r} is not configured")
            targets = [self._models[name]] if name is not None else list(self._models.values())
            wait_s = self._config.proxy.queue_timeout_s if timeout_s is None else timeout_s
            for runtime in targets:
                runtime.unloads_pending += 1
        deadline = time.monotonic() + wait_s
        try:
            for runtime in targets:
                if self._unload_one(runtime, force, deadline, wait_s, cause):
                    stopped.append(runtime.model.name)
        finally:
            with self._cond:
                for runtime in targets:
                    runtime.unloads_pending -= 1
                self._cond.notify_all()
        return stopped

    def _unload_one(self, runtime: ModelRecord, force: bool, deadline: float, wait_s: float, cause: str) -> bool:
        did_stop = False
        while True:
            with self._cond:
                state = runtime.state
                if state in (State.STOPPED, State.FAILED):
                    return did_stop
                step = None
                # A forced stop is answered "at once": llama.cpp ignores SIGTERM while it
                # generates, so it must not sit out the whole stop_grace before the SIGKILL.
                grace_s = min(FORCED_STOP_GRACE_S, self._config.proxy.stop_grace_s) if force else None
                if state is State.READY and (force or runtime.leases == 0):
                    step = self._claim_stop(runtime, reason=f"{'reload' if cause == 'reload' else 'admin'}"
                                                            f"{', forced' if force else ''}", grace_s=grace_s,
                                            cause=cause)
                elif state is State.STARTING and force:
                    step = self._claim_stop(runtime, reason="admin, forced", grace_s=grace_s, cause=cause)
                if step is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ModelBusy(f"{runtime.model.name}: still {state.value} with {runtime.leases} "
                                        f"request(s) after {wait_s:g}s; use force to cut them")
                    self._cond.wait(remaining)
                    continue
            step()
            did_stop = True

    # ----- preloading ---------------------------------------------------------------------------

    def preload(self, name: str) -> bool | None:
        """Start a model with no request waiting, if it fits without evicting anything; return whether it runs.

        For proxy.preload: nothing is evicted for it and no request waits behind it (the queue goes
        first: None, ask again later). It then idles like any model: its keep_alive applies,
        pinning keeps it. Raises UnknownModel; a failed start is logged and answered False.
        """
        with self._cond:
            runtime = self._runtime(name)
            if runtime.state in (State.STARTING, State.READY):
                return True
            if self._closed or self._draining:
                return False
            if self._queue or runtime.state is State.STOPPING:
                return None
            snapshot = self._scheduling_snapshot()
            snapshot = dataclasses.replace(snapshot, queue=(name,))
            eviction = scheduling.eviction_for(snapshot, 0)
            if not isinstance(eviction, scheduling.Fits):
                log.warning("model %s: not preloaded: it does not fit beside the loaded models%s", name,
                            f" ({eviction.reason})" if isinstance(eviction, scheduling.Never | scheduling.NotYet)
                            else "")
                return False
            step = self._claim_start(runtime, None, eviction.placement)
        step()  # runs the start in this thread
        with self._cond:
            state: State = runtime.state  # declared: the start above changed it
            return state is State.READY

    # ----- reloading ----------------------------------------------------------------------------

    def reload(self, config: Config) -> list[str]:
        """Adopt a new config; return the names of models that must restart to apply it.

        Unchanged models keep running. A changed profile applies from the model's next start;
        a removed one refuses new requests. Both keep serving their in-flight requests: the
        caller stops the returned models with unload(), which waits for them.
        """
        budgets = self.memory.budgets(config)  # NVML and the models' files are read outside the lock
        self._needs(config, budgets)
        with self._cond:  # one step under the lock: no request sees half of the new config
            self._config = config
            self._budgets = budgets
            restart = []
            # A copy: adopting a removed profile drops it from _models while we walk them.
            for name, runtime in list(self._models.items()):
                model = config.models.get(name)
                runtime.removed = model is None  # a profile removed earlier may come back
                if model is not None:
                    runtime.replacement = model if model != runtime.model else None
                runtime.default_keep_alive_s = never_if_unrepresentable(
                    config.idle_timeout_s(model or runtime.model))
                if runtime.state in (State.STOPPED, State.FAILED):
                    self._adopt_replacement(runtime)
                elif model is None or runtime.replacement is not None:
                    restart.append(name)
            for name, model in config.models.items():
                if name not in self._models:
                    self._models[name] = ModelRecord(model, never_if_unrepresentable(config.idle_timeout_s(model)))
            self._cond.notify_all()  # waiters for removed models answer now
        self.wakeups.preload.set()  # a model added to proxy.preload starts now
        return restart

    def _adopt_replacement(self, runtime: ModelRecord) -> None:
        """Apply a reloaded profile to a model that is not running (under the lock)."""
        if runtime.removed and runtime.state in (State.STOPPED, State.FAILED):
            self._models.pop(runtime.model.name, None)
        elif runtime.replacement is not None:
            runtime.model = runtime.replacement
            runtime.replacement = None
            runtime.keep_alive_s = runtime.default_keep_alive_s

    # ----- lifecycle ----------------------------------------------------------------------------

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait up to timeout_s for running ones to end; return whether they did."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()  # waiters answer 503 now
            return self._cond.wait_for(
                lambda: not self._queue and all(runtime.leases == 0 for runtime in self._models.values()),
                timeout=timeout_s)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, wake every waiter and stop every child. Blocks until they are reaped."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            steps = [self._claim_stop(runtime, reason="shutdown", cause="shutdown")
                     for runtime in self._models.values() if runtime.state in LOADED and runtime.process]
            for runtime in self._models.values():
                if runtime.state is State.STARTING:  # spawn not yet published: the starter stops it
                    runtime.generation += 1
        self.wakeups.reaper.set()
        self.wakeups.preload.set()  # the preloader sees _closed and ends
        for step in steps:
            step()
        with self._cond:  # a start that was spawning sees the new generation and stops its child
            self._cond.wait_for(lambda: self._starting_threads == 0, timeout=timeout_s)

    # ----- views --------------------------------------------------------------------------------

    def listen(self, listener: Listener) -> None:
        """Tell `listener` of every state transition from now on (see records.Listener)."""
        with self._cond:
            self._listeners.append(listener)

    def snapshot(self) -> list[ModelStatus]:
        """Return every model's status (a consistent copy taken under the lock)."""
        with self._cond:
            now_mono = self._clock()
            now_wall = datetime.now(timezone.utc)
            queued: dict[str, int] = {}
            for ticket in self._queue:
                queued[ticket.name] = queued.get(ticket.name, 0) + 1
            return [runtime.status(queued.get(name, 0), now_mono, now_wall, self._need(runtime.model))
                    for name, runtime in self._models.items()]

    def is_ready(self, name: str) -> bool:
        """Say whether `name` is loaded and ready now: a request for it needs no load (it may still queue)."""
        with self._cond:
            runtime = self._models.get(name)
            return runtime is not None and runtime.state is State.READY

    def status(self, name: str) -> ModelStatus | None:
        """Return one model's status (None when it is not configured)."""
        return next((status for status in self.snapshot() if status.name == name), None)

    def budgets(self) -> dict[str, int]:
        """Return the bytes each device may hold (`gpu0`, `ram`); empty when memory is not counted."""
        with self._cond:
            return dict(self._budgets)

    @property
    def config(self) -> Config:
        return self._config

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed
