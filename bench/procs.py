"""Processes the benchmark starts: spawn, wait for HTTP readiness, stop by PID, never leave one behind.

Every child runs in its own session (so a Ctrl-C in the terminal reaches only the benchmark, which
then stops its children in order) and, on Linux, with a parent-death signal, so even a benchmark
killed with SIGKILL leaves no orphan. `Processes.close()` stops whatever is still running, in
reverse start order, and is meant for a `finally` block.
"""

from __future__ import annotations

import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from proxy.supervisor import die_with_parent

log = logging.getLogger("bench")

def free_port() -> int:
    """Return a loopback port nothing is bound to right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def process_exited(pid: int) -> bool:
    """Say whether a process is gone or a zombie (it has exited; only its parent's wait is missing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def http_status(port: int, path: str, timeout_s: float = 1.0) -> int | None:
    """GET a loopback path; return the status, or None when nothing answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


class Processes:
    """The children this benchmark started, stopped by PID (their process groups) when closed."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._children: list[subprocess.Popen[bytes]] = []
        self._foreign: dict[int, float] = {}  # pid -> create time: grandchildren we saw (the proxy's backends)

    def spawn(self, argv: Sequence[str], *, name: str, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a child in its own session with its output in <log_dir>/<name>.log."""
        self._log_dir.mkdir(parents=True, exist_ok=True)
        with (self._log_dir / f"{name}.log").open("ab") as sink:
            popen = subprocess.Popen(
                list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        self._children.append(popen)
        return popen

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self._log_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def watch(self, pid: int) -> None:
        """Remember a process someone else started for us (a backend of the proxy) to check it at close."""
        try:
            with open(f"/proc/{pid}/stat") as stat:
                self._foreign.setdefault(pid, float(stat.read().rsplit(")", 1)[1].split()[19]))
        except (OSError, IndexError, ValueError):
            pass

    def stop(self, popen: subprocess.Popen[bytes], grace_s: float = 10.0) -> float:
        """SIGTERM the child's process group, SIGKILL after grace_s; return seconds until it was reaped."""
        started = time.monotonic()
        if popen.poll() is None:
            _signal_group(popen.pid, signal.SIGTERM)
            try:
                popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("pid %d ignored SIGTERM for %gs: SIGKILL", popen.pid, grace_s)
                _signal_group(popen.pid, signal.SIGKILL)
                popen.wait(10)
        elapsed = time.monotonic() - started
        _signal_group(popen.pid, signal.SIGKILL)  # anything it left in its group
        if popen in self._children:
            self._children.remove(popen)
        return elapsed

    def time_sigterm_exit(self, popen: subprocess.Popen[bytes], timeout_s: float = 30.0) -> float:
        """SIGTERM the child's group as the proxy does; return seconds until the child had exited.

        Polls the process table (an exited child is a zombie until reaped), which is finer than
        Popen.wait's growing sleeps. The caller still calls stop() to reap it.
        """
        started = time.monotonic()
        _signal_group(popen.pid, signal.SIGTERM)
        while not process_exited(popen.pid):
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"pid {popen.pid} did not exit within {timeout_s:g}s of SIGTERM")
            time.sleep(0.0002)
        return time.monotonic() - started

    def close(self) -> list[int]:
        """Stop every child still running (newest first), then kill watched grandchildren that survived.

        Returns the PIDs of survivors that had to be killed after their parent was gone.
        """
        for popen in reversed(list(self._children)):
            try:
                self.stop(popen)
            except Exception:  # keep stopping the others
                log.exception("cannot stop pid %d", popen.pid)
                _signal_group(popen.pid, signal.SIGKILL)
        survivors = []
        for pid, started in self._foreign.items():
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] not in ("Z", "X") and float(fields[19]) == started:
                survivors.append(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return survivors


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass


def wait_http_ok(port: int, path: str, *, timeout_s: float, interval_s: float = 0.002,
                 alive: Callable[[], bool] | None = None) -> float:
    """Poll GET path until it answers 200; return the monotonic time it did. Raises RuntimeError."""
    deadline = time.monotonic() + timeout_s
    while True:
        if http_status(port, path, timeout_s=1.0) == 200:
            return time.monotonic()
        if alive is not None and not alive():
            raise RuntimeError(f"the process on port {port} exited before {path} answered 200")
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port}: {path} did not answer 200 within {timeout_s:g}s")
        time.sleep(interval_s)
