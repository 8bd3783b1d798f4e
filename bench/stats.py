"""Summaries of repeated measurements: min, median, p95 (linear interpolation), max, mean."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Summary:
    n: int
    min: float
    median: float
    p95: float
    max: float
    mean: float

    def scaled(self, factor: float) -> Summary:
        """Return the summary in another unit (e.g. seconds to milliseconds)."""
        return Summary(self.n, self.min * factor, self.median * factor, self.p95 * factor, self.max * factor,
                       self.mean * factor)

    def as_dict(self, digits: int = 4) -> dict[str, Any]:
        return {key: (value if isinstance(value, int) else _round(value, digits)) for key, value in asdict(self).items()}


def percentile(ordered: Sequence[float], q: float) -> float:
    """Return the q-quantile (0..1) of already sorted values, interpolating between neighbours."""
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Iterable[float]) -> Summary:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no measurements to summarize")
    return Summary(n=len(ordered), min=ordered[0], median=percentile(ordered, 0.5), p95=percentile(ordered, 0.95),
                   max=ordered[-1], mean=sum(ordered) / len(ordered))


def _round(value: float, digits: int) -> float:
    if math.isnan(value) or math.isinf(value) or value == 0:
        return value
    magnitude = math.floor(math.log10(abs(value)))
    return round(value, max(digits - 1 - magnitude, 0))  # `digits` significant digits, never beyond units
