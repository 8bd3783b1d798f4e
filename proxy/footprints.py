"""Footprints and budgets for the scheduler: what each model takes, best source first (declared in its
profile, learned from NVML after a load and kept in `state_dir`, estimated from its files), what each
device may hold, and the waits and checks around a load. The manager asks; scheduling.py decides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from proxy.config import Config, ConfigError, ModelConfig
from proxy.estimate import estimate
from proxy.memory import RAM, Need, Placement, format_size, gpu, gpu_index
from proxy.nvml import Device, Gpus

log = logging.getLogger(__name__)

STORE_FILE = "footprints.json"  # in state_dir: the footprints measured after loads
FREE_WAIT_S = 5.0               # after a stop, how long a start waits for NVML to show the memory back
FREE_POLL_S = 0.25

# What backends print when a load runs out of memory: torch (TabbyAPI), CUDA and llama.cpp's allocators.
_OUT_OF_MEMORY = re.compile(
    r"(?i)out of memory|OutOfMemoryError|cudaMalloc failed|CUDA_ERROR_OUT_OF_MEMORY|"
    r"failed to allocate [A-Za-z0-9_]+ buffer|unable to allocate [A-Za-z0-9_]+ buffer|"
    r"ErrorOutOfDeviceMemory|insufficient memory")

Estimator = Callable[[ModelConfig, "Path | None"], "int | None"]


def is_out_of_memory(output: str | None) -> bool:
    """Say whether a failed start's output (the backend's last lines) reports running out of memory."""
    return bool(output) and _OUT_OF_MEMORY.search(output or "") is not None


class Memory:
    """The memory side of scheduling, shared by the manager's threads (its own lock guards the caches)."""

    def __init__(self, gpus: Gpus | None = None, state_dir: Path | None = None,
                 estimator: Estimator = estimate) -> None:
        self.gpus = gpus
        self._store = None if state_dir is None else state_dir / STORE_FILE
        self._estimate = estimator
        self._lock = threading.Lock()
        self._needs: dict[int, tuple[ModelConfig, Need]] = {}  # by id(profile); the profile is kept so ids stay unique
        self._learned = self._read_store()

    # ----- budgets --------------------------------------------------------------------------------

    def budgets(self, config: Config) -> dict[str, int]:
        """Return bytes per device (`gpu0`, `ram`) from `proxy.gpus` and `proxy.ram_budget`; empty: not counted.

        Raises ConfigError when `auto` is asked of a machine where NVML sees no GPU.
        """
        settings = config.proxy
        budgets: dict[str, int] = {}
        if settings.gpus is not None:
            seen = {device.index: device for device in (self.gpus.devices() if self.gpus is not None else [])}
            wanted: Mapping[int, int | None] = ({index: None for index in seen} if settings.gpus == "auto"
                                                else settings.gpus if isinstance(settings.gpus, Mapping) else {})
            for index, size in wanted.items():
                if size is None:
                    if index not in seen:
                        raise ConfigError(f"{config.path}: proxy.gpus: auto needs NVML to see GPU {index} (the "
                                          f"nvidia-ml-py package and an NVIDIA driver); it sees "
                                          f"{', '.join(map(str, seen)) or 'no GPU'}. Give a size instead")
                    size = max(0, seen[index].total - settings.gpu_reserve)
                elif seen and index not in seen:
                    log.warning("proxy.gpus names GPU %s, which NVML does not see (it sees %s)", index,
                                ", ".join(map(str, seen)))
                budgets[gpu(index)] = size
            if not budgets:
                raise ConfigError(f"{config.path}: proxy.gpus: auto found no GPU (NVML is unavailable); "
                                  "remove it or give sizes per GPU")
        if settings.ram_budget is not None:
            budgets[RAM] = settings.ram_budget
        return budgets

    # ----- footprints -----------------------------------------------------------------------------

    def need(self, model: ModelConfig, config: Config, *, estimate: bool = True) -> Need:
        """Return what `model` takes once loaded: declared, else learned, else estimated, else unknown (nothing).

        The first estimate of a profile reads its files (seconds for a large GGUF); later calls are a
        lookup. estimate=False never reads them: what /status shows while memory is not counted.
        """
        with self._lock:
            cached = self._needs.get(id(model))
            if cached is not None and cached[0] is model:
                return cached[1]
            need = model.footprint or self._learned_need(model)
        if need is None:
            if not estimate:
                return Need()  # not kept: an estimate may be asked for later
            need = self._estimated_need(model, config)
        with self._lock:
            self._needs[id(model)] = (model, need)
        return need

    def _learned_need(self, model: ModelConfig) -> Need | None:
        learned = self._learned.get(model.name)
        if learned is None or learned.get("key") != settings_key(model):
            return None
        usage = {int(index): int(size) for index, size in learned.get("vram", {}).items()}
        return _measured_need(usage) if usage else None

    def _estimated_need(self, model: ModelConfig, config: Config) -> Need:
        estimated = self._estimate(model, config.proxy.tabby_dir)
        if not estimated:
            return Need()
        on_cpu = model.backend == "llamacpp" and (
            config.proxy.gpus is None or (model.llamacpp is not None and model.llamacpp.n_gpu_layers == 0))
        return Need(ram=estimated, source="estimated") if on_cpu else Need(vram=estimated, source="estimated")

    def measure(self, model: ModelConfig, pid: int) -> Placement:
        """Return the VRAM the backend's process group `pid` uses now per device, and remember it for `model`.

        Empty when NVML is unavailable or the backend holds no GPU memory (then nothing is learned).
        """
        if self.gpus is None:
            return {}
        usage = {index: size for index, size in self.gpus.group_usage(pid).items() if size > 0}
        if not usage:
            return {}
        with self._lock:
            previous = self._learned.get(model.name, {})
            if previous.get("key") == settings_key(model):  # keep the peak: memory grows as the cache fills
                for index, size in previous.get("vram", {}).items():
                    usage[int(index)] = max(usage.get(int(index), 0), int(size))
            self._learned[model.name] = {
                "key": settings_key(model),
                "vram": {str(index): size for index, size in sorted(usage.items())},
                "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            self._needs.pop(id(model), None)  # the next start counts what was measured
            self._write_store()
        log.info("model %s: measured %s of VRAM (%s)", model.name, format_size(sum(usage.values())),
                 ", ".join(f"{format_size(size)} on {gpu(index)}" for index, size in sorted(usage.items())))
        return {gpu(index): size for index, size in usage.items()}

    # ----- around a load --------------------------------------------------------------------------

    def wait_for_free(self, placement: Placement, timeout_s: float = FREE_WAIT_S) -> bool:
        """Wait (bounded) until NVML shows the placement's GPU memory free, as after a stop it comes back late.

        Returns True at once without NVML or GPUs in the placement.
        """
        need = {index: size for index, size in ((gpu_index(device), size) for device, size in placement.items())
                if index is not None and size > 0}
        if self.gpus is None or not need:
            return True
        return self.gpus.wait_for_free(need, timeout_s=timeout_s, poll_s=FREE_POLL_S)

    def devices(self) -> list[Device]:
        """Return every GPU as NVML sees it now (empty without NVML): for /status."""
        return self.gpus.devices() if self.gpus is not None else []

    def close(self) -> None:
        if self.gpus is not None:
            self.gpus.close()

    # ----- the store of measured footprints -------------------------------------------------------

    def _read_store(self) -> dict[str, dict[str, Any]]:
        if self._store is None or not self._store.is_file():
            return {}
        try:
            stored = json.loads(self._store.read_text())
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable, measured footprints start afresh: %s", self._store, exc)
            return {}
        return {str(name): entry for name, entry in stored.items() if isinstance(entry, dict)} \
            if isinstance(stored, dict) else {}

    def _write_store(self) -> None:
        if self._store is None:
            return
        try:
            self._store.parent.mkdir(parents=True, exist_ok=True)
            temporary = self._store.with_suffix(".tmp")
            temporary.write_text(json.dumps(self._learned, indent=1, sort_keys=True))
            temporary.replace(self._store)
        except OSError as exc:  # a footprint not remembered is measured again next time
            log.warning("%s: cannot save measured footprints: %s", self._store, exc)


def settings_key(model: ModelConfig) -> str:
    """Return a short digest of the settings that change a model's footprint: a learned one is kept only for them."""
    settings: dict[str, Any] = {"backend": model.backend}
    if model.backend == "tabbyapi":
        settings.update({key: model.tabby.get(key) for key in ("model", "draft_model")})
    elif model.llamacpp is not None:
        settings["llamacpp"] = repr(model.llamacpp)
    elif model.command is not None:
        settings["command"] = [model.command.argv, dict(model.command.env)]
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _measured_need(usage: Mapping[int, int]) -> Need:
    if len(usage) == 1:
        return Need(vram=sum(usage.values()), source="measured")  # placed anew at each start
    gpus = tuple(sorted(usage))
    return Need(vram=sum(usage.values()), gpus=gpus, split=tuple(usage[index] for index in gpus), source="measured")
