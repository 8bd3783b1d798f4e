"""Backend processes: spawn in their own session, drain output, wait until ready, stop, detect exit.

Also owns the loopback port pool. A backend's session (what a wrapper or a forking server starts)
is stopped with it; proxy/sessions.py finds its processes and records them for a restarted proxy
to reap. Knows nothing of models' states, leases or clients.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import io
import logging
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from proxy.backends import LaunchPlan, Probe
from proxy.errors import BackendFailed, BackendTimeout
from proxy.sessions import (
    KILL_WAIT_S, SPAWN_MARK, ChildRegistry, ProcessStat, process_start_ticks, session_members, signal_processes,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

TAIL_LINES = 200
LINE_BYTES = 8 * 1024               # output read at a time: a line without newline is cut in pieces
LOG_ROTATE_BYTES = 20 * 1024 * 1024  # a backend's log moves to <model>.log.1 beyond this, even while running
SEE_OUTPUT = "its output is in the proxy's log and, for admin keys, in /status"
_PR_SET_PDEATHSIG = 1

ExitCallback = Callable[["BackendProcess", int], None]


class BackendProcess:
    """One running backend child: its output, readiness and shutdown."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], plan: LaunchPlan, log_path: Path,
                 log_rotate_bytes: int = LOG_ROTATE_BYTES) -> None:
        self.name = name
        self.plan = plan
        self.log_path = log_path
        self._popen = popen
        # The child is not reaped yet, so its PID (= its session and group id) names it alone.
        self._start_ticks = process_start_ticks(popen.pid) or 0
        self._log_rotate_bytes = log_rotate_bytes
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._partial = b""  # the line being printed: at most LINE_BYTES once the drainer is done with it
        self._output_done = threading.Event()  # the drainer has read the last byte
        self._stopping = threading.Event()     # stop() was called: it, not the watcher, ends the session
        self._stopped = threading.Event()
        self._reaped = threading.Event()       # the watcher reaped the leader (set only once it watches)
        self._watched = False
        self._stop_grace_s = 0.0
        self._output_log = logging.getLogger(f"proxy.backend.{name}")

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def port(self) -> int:
        return self.plan.port

    @property
    def base_url(self) -> str:
        return self.plan.base_url

    @property
    def headers(self) -> Mapping[str, str]:
        return self.plan.headers

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        """Return the last lines the child printed, the one it is still printing included."""
        partial = _visible(self._partial)
        return "\n".join([*self._tail, *([partial] if partial else [])][-lines:])

    def wait_ready(self, probe: Probe | None = None, timeout_s: float = 600.0) -> float:
        """Block until the probe says ready; return the seconds it took.

        Raises BackendFailed when the child exits first or the probe finds someone else's server,
        and BackendTimeout after timeout_s. Their message is a summary for clients; their detail
        (the log and admins only) has the last output, which may show paths, argv and tracebacks.
        """
        probe = probe or self.plan.probe
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            if self._popen.poll() is not None:
                self._output_done.wait(1.0)  # let the drainer collect the last lines
                tail = self.tail()
                reason = reason_from_output(tail)
                raise BackendFailed(
                    f"{self.name}: the backend exited with {describe_exit(self._popen.returncode)} while starting"
                    f"{f': {reason}' if reason else ''}; {SEE_OUTPUT}", detail=f"last output:\n{tail}")
            if probe():
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                raise BackendTimeout(
                    f"{self.name}: the backend was not ready within {timeout_s:g}s (startup_timeout); "
                    f"{SEE_OUTPUT}", detail=f"last output:\n{self.tail()}")
            # Quick polls while a small model may be about to answer (a refused connection costs
            # microseconds; each poll of the first second is at most 2 ms late), gentler ones for long loads.
            elapsed = time.monotonic() - started
            interval = 0.002 if elapsed < 1 else 0.01 if elapsed < 5 else 0.05 if elapsed < 30 else 0.25
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    @property
    def progress(self) -> str | None:
        return None  # a process shows no load progress; the log has it

    def check_alive(self) -> None:
        """Nothing to do: the exit watcher reports an exit as soon as it happens."""

    def exit_reason(self, returncode: int) -> str:
        return f"the backend exited unexpectedly (exit status {returncode})"

    def stop(self, grace_s: float, successor: object = None) -> int | None:
        """Stop the child's whole session: SIGTERM to every process in it, grace period, SIGKILL.
        Blocks until the leader is reaped and nothing is left of the session, at most about
        grace_s + 10 s; never raises (callers stop children on their own error paths).

        `successor` (the model that takes the slot) matters only to resident processes.
        """
        self._stop_grace_s = grace_s
        self._stopping.set()
        try:
            if self.plan.stop_argv is not None and self._popen.poll() is None and self._stop_command(grace_s):
                return self._popen.returncode
            if self._popen.poll() is None or self._session():
                self._signal_session(signal.SIGTERM)
                if not self._wait_gone(grace_s):
                    log.warning("model %s: pid %d (or a process it started) ignored SIGTERM for %gs; sending SIGKILL",
                                self.name, self.pid, grace_s)
                    self._signal_session(signal.SIGKILL)
                    if not self._wait_gone(KILL_WAIT_S):  # stuck in the kernel (D state): nothing more to send
                        log.error("model %s: pid %d, or processes of its session %s, survived SIGKILL for %gs",
                                  self.name, self.pid, [member.pid for member in self._session()], KILL_WAIT_S)
        except Exception:
            log.exception("model %s: error while stopping pid %d", self.name, self.pid)
        finally:
            self._stopped.set()
        return self._popen.returncode

    def _stop_command(self, grace_s: float) -> bool:
        """Run the plan's stop command (a container's `docker stop`); return whether the backend is gone after it."""
        assert self.plan.stop_argv is not None
        started = time.monotonic()
        try:
            done = subprocess.run(self.plan.stop_argv, cwd=self.plan.cwd, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=grace_s, check=False)
            if done.returncode != 0:
                log.warning("model %s: stop_cmd exited with %s: %s", self.name, done.returncode,
                            done.stderr.decode("utf-8", "replace").strip()[-300:])
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("model %s: stop_cmd failed (%s); sending signals", self.name, type(exc).__name__)
        if self._wait_gone(max(0.0, grace_s - (time.monotonic() - started))):
            return True
        log.warning("model %s: pid %d still runs after stop_cmd and %gs; sending signals", self.name, self.pid,
                    grace_s)
        return False

    def _session(self) -> list[ProcessStat]:
        """Return what still runs in the backend's session (a wrapper's children, a server's workers)."""
        return session_members(self.pid, started_since=self._start_ticks)

    def _signal_session(self, signum: int) -> None:
        """Signal the process group, and any other group in the session (start_new_session: the
        leader's PID is both ids). While a member lives, no other process can hold these ids."""
        if self._popen.returncode is None:  # first, before the scan of /proc below: a stop starts at once
            _killpg(self._popen.pid, signum)
        members = self._session()
        if self._popen.returncode is not None and members:
            _killpg(self._popen.pid, signum)
        signal_processes([member for member in members if member.pgid != self.pid], signum)

    def _wait_gone(self, timeout_s: float) -> bool:
        """Wait until the leader is reaped and its session is empty; return whether that happened in time.

        With the exit watcher running, its reap wakes this at once: Popen.wait(timeout) beside the
        watcher's blocking wait could only poll (up to 50 ms late), as the watcher holds the reap lock.
        """
        deadline = time.monotonic() + timeout_s
        if self._watched:
            if not self._reaped.wait(timeout_s):
                return False
        else:
            try:
                self._popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return False
        pause = 0.002
        while self._session():  # what the leader started may take a moment longer
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        return True

    def start_threads(self, on_exit: ExitCallback, registry: ChildRegistry | None) -> None:
        """Start draining the child's output and watching for its exit (spawn() calls it once)."""
        threading.Thread(target=self._drain, name=f"drain-{self.name}", daemon=True).start()
        self._watched = True
        threading.Thread(target=self._watch, args=(on_exit, registry), name=f"watch-{self.name}", daemon=True).start()

    def _drain(self) -> None:
        """Copy the child's output to its log (rotated when it grows too big) and to the tail, as it comes.

        Reads whatever has arrived, at most LINE_BYTES at a time, so output without newlines (a
        \r progress bar) is neither held back nor held in memory without bound.
        """
        stream = self._popen.stdout
        assert isinstance(stream, io.BufferedIOBase)  # Popen's default buffering: it has read1
        sink = None
        try:
            sink = self.log_path.open("ab")
            written = sink.tell()
            for chunk in iter(lambda: stream.read1(LINE_BYTES), b""):
                if written + len(chunk) > self._log_rotate_bytes and written > 0:
                    sink.close()
                    self.log_path.replace(self.log_path.with_suffix(".log.1"))
                    sink = self.log_path.open("ab")
                    written = 0
                sink.write(chunk)
                sink.flush()
                written += len(chunk)
                self._remember(chunk)
        except Exception:
            log.exception("model %s: error while reading backend output", self.name)
        finally:
            stream.close()
            if sink is not None:
                sink.close()
            if self._partial:
                self._commit(self._partial)
                self._partial = b""
            self._output_done.set()

    def _remember(self, chunk: bytes) -> None:
        """Add output to the tail line by line; a line longer than LINE_BYTES is cut in pieces."""
        *complete, partial = (self._partial + chunk).split(b"\n")
        for raw in complete:
            self._commit(raw)
        while len(partial) > LINE_BYTES:
            restart = partial.rfind(b"\r", 0, len(partial) - 1)
            if restart >= 0:  # a terminal would have drawn over everything before the last \r
                partial = partial[restart + 1:]
            else:
                self._commit(partial[:LINE_BYTES])
                partial = partial[LINE_BYTES:]
        self._partial = partial

    def _commit(self, raw: bytes) -> None:
        line = _visible(raw)
        self._tail.append(line)
        self._output_log.debug("%s", line)

    def _watch(self, on_exit: ExitCallback, registry: ChildRegistry | None) -> None:
        """Wait for the leader's exit; end what it left in its session; then drop it from the registry
        and report the exit."""
        try:
            returncode = self._popen.wait()
        finally:
            self._reaped.set()
        if self._stopping.is_set():
            self._stopped.wait(self._stop_grace_s + 2 * KILL_WAIT_S)  # stop() is ending the session
        elif self._session():
            # It exited on its own (a crash, a wrapper whose server forked): nothing it started
            # has anyone to answer to, and it must not hold a port or a GPU.
            log.warning("model %s: pid %d exited; killing what it left running in its session", self.name, self.pid)
            self._signal_session(signal.SIGKILL)
        gone = self._wait_gone(KILL_WAIT_S)
        self._output_done.wait(KILL_WAIT_S)  # the members held the pipe: it closes with them
        if registry is not None:
            if gone:
                registry.remove(self.pid)
            else:  # kept: the next proxy to start on this state_dir tries again
                log.error("model %s: processes of session %d are still running after SIGKILL: %s",
                          self.name, self.pid, [member.pid for member in self._session()])
        try:
            on_exit(self, returncode)
        except Exception:
            log.exception("model %s: error in exit handler", self.name)


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone (its leader moved the rest elsewhere): success


def spawn(name: str, plan: LaunchPlan, *, log_dir: Path, on_exit: ExitCallback,
          registry: ChildRegistry | None = None, log_rotate_bytes: int = LOG_ROTATE_BYTES) -> BackendProcess:
    """Start a backend child in its own session and return at once; raises BackendFailed."""
    for path, text in plan.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    if log_path.exists() and log_path.stat().st_size > log_rotate_bytes:
        log_path.replace(log_path.with_suffix(".log.1"))
    with log_path.open("ab") as sink:
        sink.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(plan.argv)}\n".encode())
    mark = secrets.token_hex(8)  # inherited by whatever the backend starts, wrappers included
    env = {**os.environ, **plan.env, SPAWN_MARK: mark}
    try:
        popen = _FORKER.run(lambda: subprocess.Popen(
            plan.argv,
            cwd=plan.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent if _prctl is not None else None,
        ))
    except OSError as exc:
        raise BackendFailed(f"{name}: cannot start the backend program ({exc.strerror or type(exc).__name__})",
                            detail=f"program {plan.argv[0]!r}") from exc
    process = BackendProcess(name, popen, plan, log_path, log_rotate_bytes)
    if registry is not None:
        registry.add(popen.pid, name, mark=mark)
    process.start_threads(on_exit, registry)
    return process


def _visible(raw: bytes) -> str:
    """Return a line of output as a terminal shows it: after its last carriage return."""
    segments = [segment for segment in raw.decode("utf-8", "replace").rstrip().split("\r") if segment]
    return segments[-1] if segments else ""


_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception)|error|fatal|ERROR|FATAL)\b:?\s*(.+)$")
_ERROR_WORD = re.compile(r"(?i)\b(?:error|failed|out of memory)\b")
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s'\"/:,;()]+){2,}")
REASON_MAX = 300


def reason_from_output(tail: str) -> str | None:
    """Return the last error line of a backend's output (a Python exception's message, an `error:`
    line) with file paths cut to their last part, for clients; None when no line looks like one.

    The whole output (tracebacks, argv, paths) goes to the log and to admins only.
    """
    lines = [line.strip() for line in reversed(tail.splitlines())]
    found = next((line for line in lines if _ERROR_LINE.match(line)), None)
    found = found or next((line for line in lines if _ERROR_WORD.search(line)), None)
    if found is None:
        return None
    text = _PATH.sub(lambda path: "…/" + path.group(0).rsplit("/", 1)[-1], found)
    return text if len(text) <= REASON_MAX else text[:REASON_MAX] + "…"


def describe_exit(returncode: int | None) -> str:
    """Return 'code 3' or 'signal SIGKILL' for a returncode."""
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


def _load_prctl() -> Callable[..., int] | None:
    if sys.platform != "linux":
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()  # looked up before fork: the child between fork and exec must not load libraries


def die_with_parent() -> None:
    """In a child between fork and exec: ask Linux to SIGKILL it when its parent dies."""
    # Linux: the kernel kills the child if the proxy dies without stopping it (SIGKILL, crash).
    # The signal fires when the *thread* that forked exits, so every fork happens in _FORKER's
    # one thread, which ends only with the process (a start may run in a short-lived thread).
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Forker:
    """The one thread that starts every backend: a parent-death signal is tied to the forking thread."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def run(self, job: Callable[[], T]) -> T:
        """Run `job` in the forker thread and return what it returns (or raise what it raises)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="backend-forker", daemon=True)
                self._thread.start()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((job, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            job, done = self._jobs.get()
            try:
                done.set_result(job())
            except BaseException as exc:
                done.set_exception(exc)


_FORKER = _Forker()


class PortPool:
    """Hands out loopback ports from a range, never the same one twice while it is held."""

    def __init__(self, low: int, high: int) -> None:
        self._low = low
        self._high = high
        self._next = low
        self._held: set[int] = set()
        self._lock = threading.Lock()

    def reserve(self) -> int:
        """Return a port nothing listens on; raises BackendFailed when the range is exhausted."""
        with self._lock:
            size = self._high - self._low + 1
            for offset in range(size):
                port = self._low + (self._next - self._low + offset) % size
                if port in self._held or port_is_busy(port):
                    continue
                self._held.add(port)
                self._next = port + 1 if port < self._high else self._low
                return port
        raise BackendFailed(f"no free port in proxy.backend_ports {self._low}-{self._high}")

    def release(self, port: int) -> None:
        with self._lock:
            self._held.discard(port)


def port_is_busy(port: int) -> bool:
    """Say whether the port is taken: something listens on it (a connect, as TabbyAPI checks), or it
    cannot be bound (the local end of another connection). SO_REUSEADDR lets TIME_WAIT pass."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.25):
            return True
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False
