"""GPU memory as NVML sees it: devices with their totals and free memory, the memory our backends'
processes hold, and waiting for freed memory to show. The proxy's only access to NVML (nvidia-ml-py's
`pynvml`, imported only by `Gpus.open()`); what to do with these figures is `scheduling.py`'s.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, cast

log = logging.getLogger(__name__)


class _Memory(Protocol):
    @property
    def total(self) -> int: ...
    @property
    def free(self) -> int: ...
    @property
    def used(self) -> int: ...


class _Process(Protocol):
    @property
    def pid(self) -> int: ...
    @property
    def usedGpuMemory(self) -> int | None: ...  # None where the driver cannot tell (Windows WDDM)


class _Nvml(Protocol):
    """The part of nvidia-ml-py's `pynvml` module the proxy uses (the package has no type hints)."""

    NVMLError: type[Exception]                 # carries .value, an NVML_ERROR_* code
    NVMLLibraryMismatchError: type[Exception]  # not an NVMLError: an unversioned call the driver lacks

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> object: ...
    def nvmlDeviceGetName(self, handle: object) -> str: ...
    def nvmlDeviceGetMemoryInfo(self, handle: object) -> _Memory: ...
    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list[_Process]: ...
    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: object) -> list[_Process]: ...


@dataclass(frozen=True, slots=True)
class Device:
    """One GPU as NVML indexes it (all physical GPUs, whatever CUDA_VISIBLE_DEVICES says); bytes."""

    index: int
    name: str
    total: int
    free: int
    used: int


class Gpus:
    """An open NVML session. Thread-safe: queries run concurrently, `close()` waits for them.

    No method raises on an NVML error: a device that fails is left out of the answer, with one
    warning per device and error until it answers again.
    """

    def __init__(self, nvml: _Nvml) -> None:
        self._nvml = nvml
        self._errors: tuple[type[Exception], ...] = (nvml.NVMLError, nvml.NVMLLibraryMismatchError)
        self._cond = threading.Condition()
        self._closed = False     # guarded by _cond
        self._queries = 0        # guarded by _cond: queries in flight, which close() waits out
        self._warned: dict[tuple[int, str], str] = {}  # guarded by _cond: (device, what) -> error logged

    @classmethod
    def open(cls) -> Gpus | None:
        """Initialise NVML; return None, after one INFO line saying why, when it is unavailable."""
        try:
            nvml = cast(_Nvml, importlib.import_module("pynvml"))
        except ImportError:
            log.info("GPU memory not tracked: the pynvml module (nvidia-ml-py) is not installed")
            return None
        try:
            nvml.nvmlInit()
        except (nvml.NVMLError, nvml.NVMLLibraryMismatchError) as exc:
            log.info("GPU memory not tracked: NVML is unavailable (%s): no NVIDIA driver or GPU", exc)
            return None
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            log.info("GPU memory not tracked: NVML cannot count the GPUs (%s)", exc)
            _shutdown(nvml)
            return None
        log.info("NVML: %d GPU(s)", count)
        return cls(nvml)

    def devices(self) -> list[Device]:
        """Return every device that answers, by index, with its memory as NVML sees it now."""
        found: list[Device] = []
        with self._session() as nvml:
            if nvml is None:
                return found
            for index, handle in self._handles(nvml):
                try:
                    name = nvml.nvmlDeviceGetName(handle)
                    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                except self._errors as exc:
                    self._warn(index, "its memory", exc)
                    continue
                self._answered(index, "its memory")
                found.append(Device(index, str(name), int(memory.total), int(memory.free), int(memory.used)))
        return found

    def usage(self, pids: Iterable[int]) -> dict[int, int]:
        """Return device index -> bytes these processes hold there (devices where none runs are absent).

        Counts compute and graphics processes; a process on several devices counts on each.
        """
        wanted = set(pids)
        return self._usage(wanted.__contains__)

    def group_usage(self, pid: int) -> dict[int, int]:
        """Like `usage`, for every process in the process group or session that `pid` leads.

        A backend runs in its own session, so the workers it forks count with it.
        """
        return self._usage(lambda member: _is_led_by(member, pid))

    def wait_for_free(self, need: Mapping[int, int], timeout_s: float = 5.0, poll_s: float = 0.25) -> bool:
        """Poll until every device in `need` (index -> bytes) has that much free; say whether it did.

        Blocks up to `timeout_s`. False at once when a device in `need` cannot be read (NVML error,
        no such device, closed), after a warning; never raises for NVML's errors.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            free = {device.index: device.free for device in self.devices()}
            if self._is_closed():
                return False
            unreadable = sorted(index for index in need if index not in free)
            if unreadable:
                log.warning("GPU %s: cannot read its memory, so cannot wait for it to be free",
                            ", ".join(map(str, unreadable)))
                return False
            if all(free[index] >= size for index, size in need.items()):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(poll_s, left))

    def close(self) -> None:
        """Shut NVML down once queries in flight end; later queries answer nothing. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.wait_for(lambda: self._queries == 0)
        _shutdown(self._nvml)

    # ---- internals -----------------------------------------------------------------------------

    @contextmanager
    def _session(self) -> Iterator[_Nvml | None]:
        """Yield NVML for one query, or None once closed (the query then answers nothing)."""
        with self._cond:
            if self._closed:
                yield None
                return
            self._queries += 1
        try:
            yield self._nvml
        finally:
            with self._cond:
                self._queries -= 1
                self._cond.notify_all()

    def _is_closed(self) -> bool:
        with self._cond:
            return self._closed

    def _handles(self, nvml: _Nvml) -> Iterator[tuple[int, object]]:
        try:
            count = nvml.nvmlDeviceGetCount()
        except self._errors as exc:
            self._warn(-1, "the device count", exc)
            return
        self._answered(-1, "the device count")
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except self._errors as exc:
                self._warn(index, "its handle", exc)
                continue
            self._answered(index, "its handle")
            yield index, handle

    def _usage(self, selects: Callable[[int], bool]) -> dict[int, int]:
        held: dict[int, int] = {}
        membership: dict[int, bool] = {}  # one verdict per pid, the same on every device
        with self._session() as nvml:
            if nvml is None:
                return held
            for index, handle in self._handles(nvml):
                try:
                    processes = _processes(nvml, handle)
                except self._errors as exc:
                    self._warn(index, "its processes", exc)
                    continue
                self._answered(index, "its processes")
                for pid, size in processes.items():
                    if pid not in membership:
                        membership[pid] = selects(pid)
                    if membership[pid]:
                        held[index] = held.get(index, 0) + size
        return held

    def _warn(self, index: int, what: str, exc: Exception) -> None:
        """Log a failed read once per device, what and error (polls repeat it every 0.25 s)."""
        message = str(exc) or type(exc).__name__
        with self._cond:
            if self._warned.get((index, what)) == message:
                return
            self._warned[(index, what)] = message
        where = "NVML" if index < 0 else f"GPU {index}"
        log.warning("%s: cannot read %s (%s); left out until it answers", where, what, message)

    def _answered(self, index: int, what: str) -> None:
        with self._cond:
            self._warned.pop((index, what), None)


def _processes(nvml: _Nvml, handle: object) -> dict[int, int]:
    """Return pid -> bytes for one device's compute and graphics processes.

    A process with both contexts is listed twice, each time with its whole memory on the device:
    count it once. usedGpuMemory None (the driver cannot tell) counts as 0.
    """
    held: dict[int, int] = {}
    for process in (*nvml.nvmlDeviceGetComputeRunningProcesses(handle),
                    *nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)):
        size = int(process.usedGpuMemory or 0)
        held[int(process.pid)] = max(held.get(int(process.pid), 0), size)
    return held


def _is_led_by(pid: int, leader: int) -> bool:
    """Whether `pid` is in the process group or the session of `leader`; False once it is gone."""
    if pid == leader:
        return True
    try:
        return os.getpgid(pid) == leader or os.getsid(pid) == leader
    except OSError:  # vanished since NVML listed it, or (another PID namespace) never ours
        return False


def _shutdown(nvml: _Nvml) -> None:
    try:
        nvml.nvmlShutdown()
    except nvml.NVMLError as exc:
        log.warning("NVML shutdown failed (%s)", exc)
