"""Backend processes: spawn in their own session, drain output, wait until ready, stop, detect exit.

Also owns the loopback port pool and the registry of child PIDs that lets a restarted proxy reap
children a crashed one left behind. Knows nothing of models' states, leases or clients.
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from proxy.backends import LaunchPlan, Probe
from proxy.errors import BackendFailed, BackendTimeout

log = logging.getLogger(__name__)

TAIL_LINES = 200
LOG_ROTATE_BYTES = 20 * 1024 * 1024
_PR_SET_PDEATHSIG = 1

ExitCallback = Callable[["BackendProcess", int], None]


class BackendProcess:
    """One running backend child: its output, readiness and shutdown."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], plan: LaunchPlan, log_path: Path) -> None:
        self.name = name
        self.plan = plan
        self.log_path = log_path
        self._popen = popen
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._exited = threading.Event()
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
        """Return the last lines the child printed."""
        return "\n".join(list(self._tail)[-lines:])

    def wait_ready(self, probe: Probe | None = None, timeout_s: float = 600.0) -> float:
        """Block until the probe says ready; return the seconds it took.

        Raises BackendFailed when the child exits first (with its last output) or the probe finds
        someone else's server, and BackendTimeout after timeout_s.
        """
        probe = probe or self.plan.probe
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            if self._popen.poll() is not None:
                self._exited.wait(1.0)  # let the drainer collect the last lines
                raise BackendFailed(
                    f"{self.name}: the backend exited with {describe_exit(self._popen.returncode)} while starting; "
                    f"last output:\n{self.tail()}"
                )
            if probe():
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                raise BackendTimeout(
                    f"{self.name}: the backend was not ready within {timeout_s:g}s (startup_timeout); "
                    f"last output:\n{self.tail()}"
                )
            # Quick polls while a small model may be about to answer, gentler ones for long loads.
            elapsed = time.monotonic() - started
            interval = 0.01 if elapsed < 5 else 0.05 if elapsed < 30 else 0.25
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    @property
    def progress(self) -> str | None:
        return None  # a process shows no load progress; the log has it

    def stop(self, grace_s: float, successor: object = None) -> int | None:
        """Stop the child's whole process group: SIGTERM, grace period, SIGKILL. Blocks until reaped,
        at most grace_s + 10 s; never raises (callers stop children on their own error paths).

        `successor` (the model that takes the slot) matters only to resident processes.
        """
        if self._popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("model %s: pid %d ignored SIGTERM for %gs; sending SIGKILL", self.name, self.pid, grace_s)
                self._signal_group(signal.SIGKILL)
                try:
                    self._popen.wait(10)
                except subprocess.TimeoutExpired:  # stuck in the kernel (D state): nothing more to send
                    log.error("model %s: pid %d survived SIGKILL for 10s", self.name, self.pid)
        # The leader is gone; anything it forked into its group goes too.
        self._signal_group(signal.SIGKILL)
        return self._popen.returncode

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self._popen.pid, signum)  # start_new_session: the group id is the child's pid
        except ProcessLookupError:
            pass  # already gone: success
        except PermissionError:
            pass  # the group id was reused by someone else's session; nothing of ours is left

    def _drain(self, log_file: Path, on_exit: ExitCallback, registry: ChildRegistry | None) -> None:
        stream = self._popen.stdout
        assert stream is not None
        try:
            with log_file.open("ab") as sink:
                for raw in iter(stream.readline, b""):
                    sink.write(raw)
                    sink.flush()
                    line = raw.decode("utf-8", "replace").rstrip()
                    self._tail.append(line)
                    self._output_log.debug("%s", line)
        except Exception:
            log.exception("model %s: error while reading backend output", self.name)
        finally:
            stream.close()
        returncode = self._popen.wait()
        self._exited.set()
        if registry is not None:
            registry.remove(self.pid)
        try:
            on_exit(self, returncode)
        except Exception:
            log.exception("model %s: error in exit handler", self.name)


def spawn(name: str, plan: LaunchPlan, *, log_dir: Path, on_exit: ExitCallback,
          registry: ChildRegistry | None = None) -> BackendProcess:
    """Start a backend child in its own session and return at once; raises BackendFailed."""
    for path, text in plan.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    if log_path.exists() and log_path.stat().st_size > LOG_ROTATE_BYTES:
        log_path.replace(log_path.with_suffix(".log.1"))
    with log_path.open("ab") as sink:
        sink.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(plan.argv)}\n".encode())
    env = {**os.environ, **plan.env}
    try:
        popen = subprocess.Popen(
            plan.argv,
            cwd=plan.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent if _prctl is not None else None,
        )
    except OSError as exc:
        raise BackendFailed(f"{name}: cannot start {plan.argv[0]!r}: {exc.strerror or exc}") from exc
    process = BackendProcess(name, popen, plan, log_path)
    if registry is not None:
        registry.add(popen.pid, name)
    threading.Thread(
        target=process._drain, args=(log_path, on_exit, registry), name=f"drain-{name}", daemon=True
    ).start()
    return process


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
    # The signal fires when the *thread* that forked exits; ours are the server's long-lived
    # worker threads, which end only with the process.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


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


class ChildRegistry:
    """A file of our children's PIDs (with start times), so a restarted proxy can reap orphans."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._children: dict[int, dict[str, object]] = {}

    def add(self, pid: int, name: str) -> None:
        with self._lock:
            self._children[pid] = {"model": name, "start_ticks": process_start_ticks(pid)}
            self._write()

    def remove(self, pid: int) -> None:
        with self._lock:
            if self._children.pop(pid, None) is not None:
                self._write()

    def _write(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text(json.dumps({str(pid): entry for pid, entry in self._children.items()}))
        temporary.replace(self._path)

    def reap_stale(self, grace_s: float = 5.0) -> list[int]:
        """Stop the children a previous proxy recorded and that still run; return their PIDs."""
        try:
            recorded = json.loads(self._path.read_text())
        except (OSError, ValueError):
            recorded = {}
        reaped = []
        for pid_text, entry in recorded.items() if isinstance(recorded, dict) else ():
            ticks = entry.get("start_ticks") if isinstance(entry, dict) else None
            if not str(pid_text).isdigit() or not isinstance(ticks, int):
                continue  # not written by us: never signal on a guess
            pid = int(pid_text)
            # The same PID with the same start time is the same process, not a reused PID.
            if process_start_ticks(pid) != ticks:
                continue
            log.warning("stopping backend pid %d (model %s) left running by a previous proxy", pid, entry.get("model"))
            _stop_group(pid, grace_s)
            reaped.append(pid)
        with self._lock:
            self._children.clear()
            self._write()
        return reaped


def _stop_group(pid: int, grace_s: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and process_start_ticks(pid) is not None:
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def process_start_ticks(pid: int) -> int | None:
    """Return a process's start time in clock ticks since boot (Linux), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None  # a zombie has exited already
    return int(fields[19])
