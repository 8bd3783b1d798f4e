"""The dashboard's charts: tokens per second and time to first token over the last hour, per model,
as the geometry of small SVG line charts (pure functions; the template draws them, escaped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from proxy.observe import RequestRecord

WIDTH, HEIGHT = 320, 96
LEFT, RIGHT, TOP, BOTTOM = 40.0, 312.0, 8.0, 78.0  # the plot area inside the SVG
WINDOW_S = 3600.0


@dataclass(frozen=True, slots=True)
class Point:
    x: float
    y: float
    label: str  # the point's tooltip: when, and its value


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    points: tuple[Point, ...]
    line: str         # the polyline's points, "x,y x,y ..."
    top_label: str    # the y axis's top value
    latest: str       # the newest value, for the caption
    width: int = WIDTH
    height: int = HEIGHT
    left: float = LEFT
    right: float = RIGHT
    top: float = TOP
    bottom: float = BOTTOM


@dataclass(frozen=True, slots=True)
class ModelCharts:
    model: str
    requests: int       # in the window, with or without figures for the charts
    speed: Chart        # completion tokens per second
    ttft: Chart         # seconds to the first byte of the answer


def model_charts(records: Iterable[RequestRecord], now: float, window_s: float = WINDOW_S) -> list[ModelCharts]:
    """Return the charts of every model that served requests in the window ending at `now` (wall clock)."""
    by_model: dict[str, list[RequestRecord]] = {}
    for record in records:
        if record.model is not None and now - window_s <= record.time <= now:
            by_model.setdefault(record.model, []).append(record)
    charts = []
    for model in sorted(by_model):
        served = sorted(by_model[model], key=lambda record: record.time)
        charts.append(ModelCharts(
            model=model,
            requests=len(served),
            speed=chart("tokens/s", served, lambda record: record.tokens_per_s, now, window_s, "{:.1f} tok/s"),
            ttft=chart("time to first token", served, lambda record: record.ttft_s, now, window_s, "{:.2f} s"),
        ))
    return charts


def chart(title: str, records: list[RequestRecord], value: Callable[[RequestRecord], float | None], now: float,
          window_s: float, unit: str) -> Chart:
    """Return one line chart of `value` over time; records without a value are left out."""
    figures = [(record.time, figure) for record in records
               if (figure := value(record)) is not None and math.isfinite(figure) and figure >= 0]
    top = nice_ceiling(max((figure for _, figure in figures), default=0.0))
    start = now - window_s
    points = tuple(
        Point(x=round(LEFT + (at - start) / window_s * (RIGHT - LEFT), 1),
              y=round(BOTTOM - figure / top * (BOTTOM - TOP), 1),
              label=f"{minutes_ago(now - at)}: {unit.format(figure)}")
        for at, figure in figures)
    return Chart(
        title=title,
        points=points,
        line=" ".join(f"{point.x},{point.y}" for point in points),
        top_label=f"{top:g}",
        latest=unit.format(figures[-1][1]) if figures else "no figures yet",
    )


def nice_ceiling(value: float) -> float:
    """Return the smallest 1, 2 or 5 times a power of ten at or above value (1 for nothing)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 5.0, 10.0):
        if value <= step * power * (1 + 1e-9):
            return step * power
    return 10.0 * power


def minutes_ago(seconds: float) -> str:
    if seconds < 60:
        return f"{max(0, int(seconds))} s ago"
    return f"{int(seconds // 60)} min ago"
