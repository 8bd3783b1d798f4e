"""Memory as the scheduler counts it: sizes ("23.5GiB"), the devices a budget names (`gpu0`, `ram`),
and `Need`, what one model takes and on which GPUs. Pure values: measuring and estimating are
`nvml.py`'s and `estimate.py`'s, deciding is `scheduling.py`'s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

RAM = "ram"  # the device of CPU-only footprints
Placement = Mapping[str, int]
"""Bytes a model takes on each device it uses (`gpu0`, `gpu1`, `ram`)."""

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*")


def gpu(index: int) -> str:
    """Return the device name of GPU `index` (`gpu0`): how budgets, placements and /status name it."""
    return f"gpu{index}"


def gpu_index(device: str) -> int | None:
    """Return the index of a `gpuN` device, None for `ram`."""
    return int(device[3:]) if device.startswith("gpu") else None


def parse_size(value: object) -> int:
    """Return bytes for `value`: an integer (bytes) or a string like "23.5GiB", "512MiB", "24GB" (decimal).

    Raises ValueError naming the value; the caller adds where it was read.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f'expected a size like "24GiB", "512MiB" or bytes, got {value!r}')
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"expected a size >= 0, got {value!r}")
        return int(value)
    match = _SIZE.fullmatch(value)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f'expected a size like "24GiB", "512MiB" or "24GB", got {value!r}')
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(size: int) -> str:
    """Return bytes as people read them: "23.5 GiB", "512 MiB", "0 B"."""
    for unit, scale in (("TiB", 1024 ** 4), ("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(size) >= scale:
            return f"{size / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size} B"


def format_placement(placement: Placement) -> str:
    """Return "20 GiB on gpu0, 2 GiB on ram" (devices in name order); "nothing" for an empty one."""
    return ", ".join(f"{format_size(size)} on {device}" for device, size in sorted(placement.items())) or "nothing"


@dataclass(frozen=True, slots=True)
class Need:
    """What one model takes once loaded, and where it came from.

    `gpus` None: one GPU, chosen by the scheduler (where it fits best); a tuple: every one of them,
    `vram` split evenly, or as `split` says (bytes per GPU, in `gpus` order).
    """

    vram: int = 0
    ram: int = 0
    gpus: tuple[int, ...] | None = None
    split: tuple[int, ...] | None = None
    source: str = "unknown"  # declared, measured, estimated or unknown (counts as nothing)

    @property
    def total(self) -> int:
        return self.vram + self.ram

    def on(self, gpus: tuple[int, ...]) -> dict[str, int]:
        """Return the placement of this need on `gpus` (its own when it names them)."""
        placement = {RAM: self.ram} if self.ram else {}
        if self.vram and gpus:
            shares = self.split or _even(self.vram, len(gpus))
            placement.update({gpu(index): share for index, share in zip(gpus, shares, strict=True)})
        return placement

    def with_source(self, source: str) -> Need:
        return Need(self.vram, self.ram, self.gpus, self.split, source)


NOTHING = Need()  # an unknown footprint, or memory not counted


def _even(total: int, parts: int) -> tuple[int, ...]:
    share, rest = divmod(total, parts)
    return tuple(share + (1 if index < rest else 0) for index in range(parts))


def devices_of(placement: Placement) -> tuple[int, ...]:
    """Return the GPU indices a placement uses, in order: what the backend is told (CUDA_VISIBLE_DEVICES)."""
    return tuple(sorted(index for index in (gpu_index(device) for device in placement) if index is not None))
