"""Backend sessions in the OS process table: the registry file that lets a restarted proxy reap
what a crashed one left behind, signalling processes only by PIDs verified by start time, and the
state folder's lock that keeps a second proxy from taking a live one's backends for orphans.

Linux /proc only; knows nothing of models beyond the name it records.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KILL_WAIT_S = 10.0                # how long processes may take to vanish after SIGKILL
SPAWN_MARK = "MODEL_PROXY_SPAWN"  # in every backend's environment: proves a process is ours after a crash
LOCK_FILE = "proxy.lock"          # in state_dir: held by the one proxy that uses the folder


class ChildRegistry:
    """A file of our backends' sessions, so a restarted proxy can reap what a crashed one left behind.

    Each entry is a session leader's PID (= its session and group id) with its start time, the
    boot it ran in and the mark in its environment: enough to tell, after a crash, the processes
    still in that session from a process that merely got a reused number.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._children: dict[int, dict[str, object]] = {}

    def add(self, pid: int, name: str, mark: str | None = None) -> None:
        entry: dict[str, object] = {"model": name, "start_ticks": process_start_ticks(pid), "boot_id": boot_id()}
        if mark is not None:
            entry["mark"] = mark
        with self._lock:
            self._children[pid] = entry
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
        """Stop every process still running in a session a previous proxy recorded; return their PIDs.

        SIGTERM, up to grace_s, then SIGKILL. Only verified processes are signalled (see _orphans).
        """
        try:
            recorded = json.loads(self._path.read_text())
        except (OSError, ValueError):
            recorded = {}
        reaped: list[int] = []
        for pid_text, entry in recorded.items() if isinstance(recorded, dict) else ():
            orphans = _orphans(pid_text, entry)
            if orphans:
                log.warning("stopping %d process(es) of backend session %s (model %s) left running by a previous "
                            "proxy: pids %s", len(orphans), pid_text, entry.get("model"), [o.pid for o in orphans])
                stop_processes(orphans, grace_s)
                reaped += [orphan.pid for orphan in orphans]
        with self._lock:
            self._children.clear()
            self._write()
        return reaped


def _orphans(pid_text: object, entry: object) -> list[ProcessStat]:
    """Return the live processes of a recorded session that are provably ours, leader first.

    A session id is its leader's PID, and Linux never reuses a number while any process still
    uses it as its session or group id. So: a live leader with the recorded start time proves
    the whole session; a live process with that PID but another start time means our session
    is gone (its number was free to reuse). With the leader gone, the survivors keep its number
    as their session id, but so would a later session of a reused number: each survivor must also
    carry the spawn's mark in its environment, and have started in the same boot, after the leader.
    """
    ticks = entry.get("start_ticks") if isinstance(entry, dict) else None
    if not str(pid_text).isdigit() or not isinstance(ticks, int) or not isinstance(entry, dict):
        return []  # not written by us: never signal on a guess
    pid = int(str(pid_text))
    recorded_boot = entry.get("boot_id")
    if recorded_boot is not None and recorded_boot != boot_id():
        return []  # recorded before a reboot: nothing of it survived
    members = session_members(pid, started_since=ticks)
    leader = process_stat(pid)
    if leader is not None:
        if leader.start_ticks != ticks:
            return []  # a reused PID: not ours, and no session of ours can still use the number
        return [leader, *(member for member in members if member.pid != pid)]
    mark = entry.get("mark")
    if not isinstance(mark, str) or recorded_boot is None:
        return []  # written by an older proxy: only a live leader can be verified
    return [member for member in members if has_mark(member.pid, mark)]


# ----- the OS process table (Linux /proc) ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ProcessStat:
    pid: int
    pgid: int
    sid: int
    start_ticks: int  # since boot: with the PID, it names one process for good


def process_stat(pid: int) -> ProcessStat | None:
    """Return a process's group, session and start time (Linux), or None if it is gone or a zombie."""
    try:  # os.open and os.read, not Path.read_text: a session scan reads every process's stat (4x faster)
        descriptor = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        stat = os.read(descriptor, 4096)
    except OSError:
        return None
    finally:
        os.close(descriptor)
    fields = stat[stat.rfind(b")") + 1:].split()
    if not fields or fields[0] == b"Z":
        return None  # a zombie has exited already
    return ProcessStat(pid=pid, pgid=int(fields[2]), sid=int(fields[3]), start_ticks=int(fields[19]))


def process_start_ticks(pid: int) -> int | None:
    """Return a process's start time in clock ticks since boot (Linux), or None if it is gone."""
    stat = process_stat(pid)
    return None if stat is None else stat.start_ticks


def session_members(sid: int, started_since: int = 0) -> list[ProcessStat]:
    """Return the live processes of a session (every group in it) that started at or after a tick."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    members = []
    for name in names:
        if name.isdigit():
            stat = process_stat(int(name))
            if stat is not None and stat.sid == sid and stat.start_ticks >= started_since:
                members.append(stat)
    return members


def has_mark(pid: int, mark: str) -> bool:
    """Say whether a process's environment carries a spawn's mark (unreadable: no)."""
    try:
        environment = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{SPAWN_MARK}={mark}".encode() in environment.split(b"\0")


def boot_id() -> str | None:
    """Return this boot's id (Linux), which tells start times of different boots apart."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def signal_processes(processes: Iterable[ProcessStat], signum: int) -> None:
    """Signal each process by PID, unless the PID now names another process (checked by start time)."""
    for process in processes:
        current = process_stat(process.pid)
        if current is None or current.start_ticks != process.start_ticks:
            continue
        try:
            os.kill(process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # gone: success


def stop_processes(processes: list[ProcessStat], grace_s: float) -> None:
    """SIGTERM the processes, wait up to grace_s for them to go, then SIGKILL what is left."""
    signal_processes(processes, signal.SIGTERM)
    left = _wait_gone(processes, grace_s)
    if left:
        signal_processes(left, signal.SIGKILL)
        left = _wait_gone(left, KILL_WAIT_S)
    if left:
        log.error("processes %s survived SIGKILL for %gs", [process.pid for process in left], KILL_WAIT_S)


def _wait_gone(processes: list[ProcessStat], timeout_s: float) -> list[ProcessStat]:
    """Wait up to timeout_s for the processes to exit; return those still running."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [process for process in processes if process_start_ticks(process.pid) == process.start_ticks]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


# ----- one proxy per state folder --------------------------------------------------------------------

class StateDirInUse(Exception):
    """Another live proxy holds the state folder's lock."""


def lock_state_dir(state_dir: Path) -> int:
    """Take the state folder's exclusive lock for the life of the process; return its descriptor.

    The kernel drops the lock when the process dies, however it dies, and backends never inherit
    it (the descriptor is close-on-exec). Raises StateDirInUse, naming the PID that holds it.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(descriptor)
        raise StateDirInUse(f"{state_dir} is in use by another proxy (pid {holder}); stop it, or give this "
                            "one its own proxy.state_dir") from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor
