"""Fake GPUs in files, for tests/fake_nvml/pynvml.py (the fake NVML) and the fake backends that
hold "VRAM". Standard library only; any process that shares FAKE_NVML_DIR sees the same GPUs.

The folder holds `devices.json`, a list of {"total", "name", "other_used", "errors"} (only total
is required; bytes; other_used: memory of processes that are not ours; errors: {"nvmlDeviceGetMemoryInfo": 15} makes
that fake NVML call raise NVMLError(15) for that device), and `procs/<pid>.json`, one per process
holding memory: {"usage": {"0": bytes}, "release_s": 0.0, "kind": "compute"}. Once the process
is gone (or a zombie) its memory stays used for release_s seconds after someone first notices
(recorded as "dead_since", wall-clock seconds), then the file goes: VRAM that frees slowly.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ENV = "FAKE_NVML_DIR"
DEVICES = "devices.json"
PROCS = "procs"
KINDS = ("compute", "graphics", "both")  # which NVML process lists show a process


def folder(directory: str | os.PathLike[str] | None = None) -> Path:
    """Return `directory`, else $FAKE_NVML_DIR; raise LookupError when neither names one."""
    named = directory if directory is not None else os.environ.get(ENV)
    if not named:
        raise LookupError(f"no fake GPU folder: pass one or set {ENV}")
    return Path(named)


def setup(directory: str | os.PathLike[str], devices: Sequence[Mapping[str, Any] | int]) -> Path:
    """Write fake GPUs into `directory` (made if missing; old processes forgotten) and return it.

    Each device is its total in bytes or a mapping with "total" and optionally "name" (default
    "Fake GPU <i>"), "other_used" (default 0) and "errors" ({NVML function name: NVML error code}).
    """
    path = Path(directory)
    (path / PROCS).mkdir(parents=True, exist_ok=True)
    for stale in (path / PROCS).glob("*.json"):
        stale.unlink(missing_ok=True)
    entries = []
    for index, device in enumerate(devices):
        spec: Mapping[str, Any] = {"total": device} if isinstance(device, int) else device
        entries.append({"name": spec.get("name", f"Fake GPU {index}"), "total": int(spec["total"]),
                        "other_used": int(spec.get("other_used", 0)), "errors": dict(spec.get("errors", {}))})
    _write(path / DEVICES, entries)
    return path


def set_device(device: int, directory: str | os.PathLike[str] | None = None, **fields: Any) -> None:
    """Change fields of one fake GPU: other_used=..., errors={...}, name=..., total=..."""
    path = folder(directory) / DEVICES
    with _locked(folder(directory)):
        entries = json.loads(path.read_text())
        entries[device].update(fields)
        _write(path, entries)


def register(pid: int, usage: Mapping[int, int | None], release_s: float = 0.0, kind: str = "compute",
             directory: str | os.PathLike[str] | None = None) -> None:
    """Record that process `pid` holds `usage` (physical device index -> bytes) whether or not it fits.

    A size of None is listed by NVML with usedGpuMemory None (as on Windows) and counts as 0.
    `kind` says which NVML lists show it: "compute", "graphics" or "both".
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    root = folder(directory)
    with _locked(root):
        _register(root, pid, usage, release_s, kind)


def allocate(pid: int, usage: Mapping[int, int], release_s: float = 0.0,
             directory: str | os.PathLike[str] | None = None) -> int | None:
    """Register `pid` with `usage` if it fits everywhere, atomically; else return the device it does not fit.

    A device index beyond the fake GPUs does not fit either. Two processes allocating at once never
    both get the last free bytes.
    """
    root = folder(directory)
    with _locked(root):
        state = devices(root)
        for index, size in sorted(usage.items()):
            if index >= len(state) or state[index]["free"] < size:
                return index
        _register(root, pid, usage, release_s, "compute")
    return None


def unregister(pid: int, directory: str | os.PathLike[str] | None = None) -> None:
    """Forget process `pid` at once, as if its memory were already free."""
    (folder(directory) / PROCS / f"{pid}.json").unlink(missing_ok=True)


def devices(directory: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Return each fake GPU now: its devices.json fields plus "used" and "free" (bytes).

    Raises FileNotFoundError without devices.json.
    """
    root = folder(directory)
    entries: list[dict[str, Any]] = json.loads((root / DEVICES).read_text())
    held = [0] * len(entries)
    for process in processes(root):
        for index, size in process["usage"].items():
            if 0 <= index < len(held):
                held[index] += size or 0
    for index, (entry, size) in enumerate(zip(entries, held)):
        entry.setdefault("name", f"Fake GPU {index}")  # devices.json may be written by hand: only total is required
        entry.setdefault("other_used", 0)
        entry.setdefault("errors", {})
        entry["used"] = min(entry["total"], entry["other_used"] + size)
        entry["free"] = entry["total"] - entry["used"]
    return entries


def free(device: int, directory: str | os.PathLike[str] | None = None) -> int:
    """Return the free bytes of physical fake GPU `device` now."""
    return int(devices(directory)[device]["free"])


def processes(directory: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Return the processes holding memory now: {"pid", "usage" ({int device: bytes or None}), "kind",
    "alive"}. Expires the dead ones whose release_s has passed, and starts the clock of newly dead ones.
    """
    root = folder(directory)
    found = []
    for path in sorted((root / PROCS).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            pid = int(path.stem)
        except (OSError, ValueError):  # removed meanwhile, or half written by a foreign hand
            continue
        alive = is_alive(pid)
        if not alive:
            now = time.time()
            if "dead_since" not in record:
                record["dead_since"] = now
                _write(path, record)
            if now - float(record["dead_since"]) >= float(record.get("release_s", 0.0)):
                path.unlink(missing_ok=True)
                continue
        usage = {int(index): (None if size is None else int(size)) for index, size in record["usage"].items()}
        found.append({"pid": pid, "usage": usage, "kind": record.get("kind", "compute"), "alive": alive})
    return found


def is_alive(pid: int) -> bool:
    """Whether `pid` runs: it exists and is not a zombie (exited, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, someone else's
    if not os.path.isdir("/proc/self"):
        return True  # no /proc here (not Linux): trust os.kill
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # gone since os.kill
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _register(root: Path, pid: int, usage: Mapping[int, int | None], release_s: float, kind: str) -> None:
    record = {"usage": {str(index): size for index, size in usage.items()}, "release_s": float(release_s),
              "kind": kind}
    _write(root / PROCS / f"{pid}.json", record)


def _write(path: Path, content: object) -> None:
    """Replace `path` in one step, so that readers in other processes never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    temporary.write_text(json.dumps(content))
    temporary.replace(path)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold the folder's lock: one check-then-register at a time, across processes."""
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
