"""A fake of nvidia-ml-py's `pynvml`: exactly the calls proxy/nvml.py makes, same names and shapes,
answered from the fake GPUs in $FAKE_NVML_DIR (see fake_gpu.py). Put this folder first on
PYTHONPATH (or sys.path) so that `import pynvml` finds it; needs fake_gpu.py beside it.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import fake_gpu

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

_MESSAGES = {  # as the real module words them
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """An NVML call failed; `value` is the NVML_ERROR_* code."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML Error with code {self.value}")


class NVMLLibraryMismatchError(Exception):
    """The real module raises it (not an NVMLError) when an unversioned call is missing from the driver."""


class c_nvmlMemory_t:
    """What nvmlDeviceGetMemoryInfo returns (bytes)."""

    def __init__(self, total: int, free: int, used: int) -> None:
        self.total = total
        self.free = free
        self.used = used


class nvmlFriendlyObject:
    """A running process, as the real module's process lists give it."""

    def __init__(self, pid: int, usedGpuMemory: int | None) -> None:
        self.pid = pid
        self.usedGpuMemory = usedGpuMemory
        self.gpuInstanceId = 0xFFFFFFFF  # not a MIG instance
        self.computeInstanceId = 0xFFFFFFFF


class c_nvmlDevice_t:
    """An opaque device handle."""

    def __init__(self, index: int) -> None:
        self.index = index


_lock = threading.Lock()
_refcount = 0  # guarded by _lock: NVML counts inits and shutdowns


def nvmlInit() -> None:
    global _refcount
    directory = os.environ.get(fake_gpu.ENV)
    if not directory:
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)  # as on a machine without the driver
    if not os.path.isfile(os.path.join(directory, fake_gpu.DEVICES)):
        raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
    with _lock:
        _refcount += 1


def nvmlShutdown() -> None:
    global _refcount
    with _lock:
        if _refcount == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        _refcount -= 1


def nvmlDeviceGetCount() -> int:
    return len(_devices())


def nvmlDeviceGetHandleByIndex(index: int) -> c_nvmlDevice_t:
    _device(c_nvmlDevice_t(index), "nvmlDeviceGetHandleByIndex")
    return c_nvmlDevice_t(index)


def nvmlDeviceGetName(handle: c_nvmlDevice_t) -> str:
    return str(_device(handle, "nvmlDeviceGetName")["name"])  # the real module decodes to str too


def nvmlDeviceGetMemoryInfo(handle: c_nvmlDevice_t) -> c_nvmlMemory_t:
    device = _device(handle, "nvmlDeviceGetMemoryInfo")
    return c_nvmlMemory_t(int(device["total"]), int(device["free"]), int(device["used"]))


def nvmlDeviceGetComputeRunningProcesses(handle: c_nvmlDevice_t) -> list[nvmlFriendlyObject]:
    return _running(handle, "nvmlDeviceGetComputeRunningProcesses", ("compute", "both"))


def nvmlDeviceGetGraphicsRunningProcesses(handle: c_nvmlDevice_t) -> list[nvmlFriendlyObject]:
    return _running(handle, "nvmlDeviceGetGraphicsRunningProcesses", ("graphics", "both"))


def _running(handle: c_nvmlDevice_t, function: str, kinds: tuple[str, ...]) -> list[nvmlFriendlyObject]:
    _device(handle, function)
    return [nvmlFriendlyObject(process["pid"], process["usage"][handle.index])
            for process in fake_gpu.processes(_folder())
            if process["kind"] in kinds and handle.index in process["usage"]]


def _device(handle: c_nvmlDevice_t, function: str) -> dict[str, Any]:
    """Return the fake GPU behind `handle`, raising the NVMLError its "errors" name for `function`."""
    devices = _devices()
    if not isinstance(handle, c_nvmlDevice_t) or not 0 <= handle.index < len(devices):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    device = devices[handle.index]
    code = device.get("errors", {}).get(function)
    if code is not None:
        raise NVMLError(int(code))
    return device


def _devices() -> list[dict[str, Any]]:
    directory = _folder()
    try:
        return fake_gpu.devices(directory)
    except FileNotFoundError:
        raise NVMLError(NVML_ERROR_GPU_IS_LOST) from None  # devices.json removed under a running test


def _folder() -> str:
    with _lock:
        initialised = _refcount > 0
    directory = os.environ.get(fake_gpu.ENV)
    if not initialised or not directory:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return directory
