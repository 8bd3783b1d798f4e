"""What the dashboard's pages show, as text: the rows of the recent requests, and the formats of sizes,
durations, footprints and idle countdowns (static/ui.js formats the live updates the same way).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from proxy.observe import RequestRecord

REQUEST_ROWS = 100  # the newest requests the table lists
OTHER_KEY = "another key"


@dataclass(frozen=True, slots=True)
class RequestRow:
    time: str
    key: str
    route: str
    model: str
    status: int
    failed: bool
    error: str
    waited: str
    ttft: str
    duration: str
    tokens: str
    bytes: str


def request_rows(records: Iterable[RequestRecord], viewer: str | None, all_keys: bool,
                 limit: int = REQUEST_ROWS) -> list[RequestRow]:
    """Return the newest requests first. Key names are shown to admins (all_keys); a client key sees
    its own name and OTHER_KEY for everyone else's."""
    newest = sorted(records, key=lambda record: record.time, reverse=True)[:limit]
    return [RequestRow(
        time=time.strftime("%H:%M:%S", time.localtime(record.time)),
        key=(record.key or "-") if all_keys or record.key == viewer else OTHER_KEY,
        route=record.route,
        model=record.model or "-",
        status=record.status,
        failed=record.status >= 400 or record.error is not None,
        error=record.error or "",
        waited=format_seconds(record.waited_s),
        ttft=format_seconds(record.ttft_s),
        duration=format_seconds(record.duration_s),
        tokens=_tokens(record),
        bytes=f"{format_bytes(record.bytes_in)} / {format_bytes(record.bytes_out)}",
    ) for record in newest]


def _tokens(record: RequestRecord) -> str:
    if record.prompt_tokens is None and record.completion_tokens is None:
        return "-"
    speed = record.tokens_per_s
    shown = f"{record.prompt_tokens if record.prompt_tokens is not None else '?'} → " \
            f"{record.completion_tokens if record.completion_tokens is not None else '?'}"
    return f"{shown} ({speed:.1f}/s)" if speed is not None else shown


def format_bytes(size: int | float | None) -> str:
    """Return a size in bytes as "512 B", "1.5 KiB", "23.5 GiB"; "-" for none."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # unreachable: GiB ends the loop


def format_seconds(seconds: float | None) -> str:
    """Return a duration as "850 ms", "2.4 s", "3m 05s"; "-" for none."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m"


def idle_text(model: Mapping[str, Any], now: datetime) -> str:
    """Return a model's idle countdown: when it unloads, "in use", "never", or "-" when not loaded."""
    if model.get("state") != "ready":
        return "-"
    if model.get("leases"):
        return "in use"
    expires_at = model.get("expires_at")
    if expires_at is None:
        return "never" if model.get("keep_alive_s") is None else "-"
    remaining = (datetime.fromisoformat(expires_at) - now).total_seconds()
    return f"unloads in {format_seconds(max(0.0, remaining))}"


def footprint_text(model: Mapping[str, Any]) -> str:
    """Return a model's footprint: "vram 4.0 GiB, ram 512.0 MiB on gpu0 (declared)"."""
    footprint = model.get("footprint") or {}
    parts = [f"{kind} {format_bytes(footprint[kind])}" for kind in ("vram", "ram") if footprint.get(kind)]
    if not parts:
        return "unknown"
    gpus = footprint.get("gpus")
    where = f" on {'+'.join(f'gpu{index}' for index in gpus)}" if gpus else ""
    return f"{', '.join(parts)}{where} ({footprint.get('source', 'unknown')})"


def held_text(model: Mapping[str, Any]) -> str:
    """Return what a loaded model takes per device: "gpu0 4.0 GiB, ram 1.0 GiB"; "-" for nothing."""
    held = model.get("memory") or {}
    return ", ".join(f"{device} {format_bytes(size)}" for device, size in held.items()) or "-"


def used_text(device: Mapping[str, Any]) -> str:
    """Return what the models on a device take, model by model."""
    used = device.get("used") or {}
    return ", ".join(f"{model} {format_bytes(size)}" for model, size in used.items()) or "-"
