"""Results: one `Metric` per measured figure, written as JSON and as a markdown table.

Each metric holds the direct and the proxied summaries (same unit), the single figure that is
compared with the target (`value`, e.g. the added p50 or a ratio), and whether it passed.
`passed` is None for figures that are only reported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import Summary


@dataclass(slots=True)
class Metric:
    key: str                       # "P1", "P4.synthetic", ...
    title: str
    unit: str                      # unit of direct, proxy and (unless ratio) value
    target: str                    # as people read it: "<= 1 ms"
    direct: Summary | None = None
    proxy: Summary | None = None
    value: float | None = None     # the figure compared with the target
    value_label: str = ""          # what value is: "added p50", "ratio of medians", ...
    value_unit: str = ""           # defaults to unit; "" for ratios
    ratio: float | None = None     # proxy median / direct median where that means something
    passed: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "title": self.title, "unit": self.unit, "target": self.target,
            "direct": self.direct.as_dict() if self.direct else None,
            "proxy": self.proxy.as_dict() if self.proxy else None,
            "value": _clean(self.value), "value_label": self.value_label, "value_unit": self.value_unit,
            "ratio": _clean(self.ratio), "passed": self.passed, "details": _clean_tree(self.details),
            "note": self.note,
        }


def _clean(value: float | None, digits: int = 4) -> float | None:
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return float(f"{value:.{digits}g}")


def _clean_tree(value: Any) -> Any:
    if isinstance(value, float):
        return _clean(value)
    if isinstance(value, dict):
        return {key: _clean_tree(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_tree(item) for item in value]
    if isinstance(value, Summary):
        return value.as_dict()
    return value


def write_results(path: Path, meta: dict[str, Any], metrics: list[Metric], notes: list[str],
                  errors: list[str]) -> Path:
    """Write the JSON file and the markdown table next to it (same stem, .md); return the .md path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "meta": _clean_tree(meta),
        "metrics": {metric.key: metric.as_dict() for metric in metrics},
        "summary": {"passed": sum(m.passed is True for m in metrics), "failed": sum(m.passed is False for m in metrics),
                    "reported": sum(m.passed is None for m in metrics), "errors": len(errors)},
        "notes": notes,
        "errors": errors,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    markdown_path = path.with_suffix(".md")
    markdown_path.write_text(markdown(meta, metrics, notes, errors))
    return markdown_path


def _figure(value: float | None, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "–"
    magnitude = abs(value)
    if magnitude >= 1000:
        text = f"{value:,.0f}"
    elif magnitude >= 100:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".strip()


def _cell(summary: Summary | None, unit: str) -> str:
    if summary is None:
        return "–"
    if summary.n == 1:
        return _figure(summary.median, unit)
    return f"{_figure(summary.median, unit)} (min {_figure(summary.min)}, p95 {_figure(summary.p95)}, n={summary.n})"


def _result(metric: Metric) -> str:
    if metric.value is None:
        return "–"
    unit = metric.value_unit if metric.value_unit or metric.value_label.startswith("ratio") else metric.unit
    sign = "+" if metric.value_label.startswith("added") and metric.value >= 0 else ""
    text = f"{sign}{_figure(metric.value, unit)}"
    return f"{text} ({metric.value_label})" if metric.value_label else text


def markdown(meta: dict[str, Any], metrics: list[Metric], notes: list[str], errors: list[str]) -> str:
    verdict = {True: "PASS", False: "**FAIL**", None: "info"}
    lines = [
        f"# Proxy benchmark ({meta.get('mode', '?')} mode)",
        "",
        f"{meta.get('started_at', '')}, {meta.get('duration_s', 0):.0f} s, {meta.get('cpus', '?')} CPUs, "
        f"Python {meta.get('python', '?')}. Cells: median (min, p95, n).",
        "",
        "| Metric | Target | Direct | Proxy | Result | Pass |",
        "|---|---|---|---|---|---|",
    ]
    for metric in metrics:
        cells = [f"**{metric.key}** {metric.title}", metric.target, _cell(metric.direct, metric.unit),
                 _cell(metric.proxy, metric.unit), _result(metric), verdict[metric.passed]]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    details = [(metric.key, metric.note) for metric in metrics if metric.note]
    if details:
        lines += ["", "Notes:", ""] + [f"- **{key}**: {note}" for key, note in details]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    if errors:
        lines += ["", "Errors (metrics that could not be measured):", ""] + [f"- {error}" for error in errors]
    return "\n".join(lines) + "\n"
