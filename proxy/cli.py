"""The operator's commands beside `keys`: `usage` reads the request log directly (no proxy needed) and
`status` asks the running proxy's /status with the admin key; both print aligned tables.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import requests

from proxy.auth import load_keys
from proxy.config import Config, ConfigError
from proxy.memory import format_size
from proxy.request_log import open_request_log, parse_window
from proxy.request_stores import StoreError
from proxy.settings import ProxySettings

STATUS_TIMEOUT_S = 10.0


def print_usage(settings: ProxySettings, since: str, by: str) -> int:
    """`usage --since 7d --by key|model|day`: print the request log's figures; 0, or 1 when it cannot be read."""
    try:
        since_s = parse_window(since)
    except ValueError as exc:
        return fail(f"--since: {exc}", status=2)
    log = open_request_log(settings, write=False)
    if log is None:
        return fail("the request log is off (proxy.request_log)")
    try:
        groups = log.usage(since_s, by)
    except StoreError as exc:
        return fail(str(exc))
    print(f"request log {log.store.name}: the last {since}, by {by} (times UTC)")
    if not groups:
        print("no requests")
        return 0
    headers = [by, "requests", "errors", "prompt tok", "completion tok", "p50 s", "p95 s", "ttft p50 s", "ttft p95 s",
               "first", "last"]
    rows = [[group[by] if group[by] is not None else "-", f"{group['requests']:,}", f"{group['errors']:,}",
             f"{group['prompt_tokens']:,}", f"{group['completion_tokens']:,}", seconds(group["duration_p50_s"]),
             seconds(group["duration_p95_s"]), seconds(group["ttft_p50_s"]), seconds(group["ttft_p95_s"]),
             utc_minute(group["first"]), utc_minute(group["last"])] for group in groups]
    print(table(headers, rows, right=range(1, 9)))
    return 0


def print_status(config: Config) -> int:
    """`status`: print what the running proxy has loaded; 1 when it is not running or refuses the key."""
    settings = config.proxy
    url = f"http://{connect_host(settings.host)}:{settings.port}/status"
    headers: dict[str, str] = {}
    if not settings.disable_auth:
        try:
            keys = load_keys(settings.api_tokens_path, create_missing=False)
        except ConfigError as exc:
            return fail(f"cannot read the admin key: {exc}")
        admin = next((entry for entry in keys.entries if entry.admin), None)
        if admin is None:  # load_keys refuses a file without one; kept for clarity
            return fail(f"{settings.api_tokens_path} has no admin key")
        headers["Authorization"] = f"Bearer {admin.key}"
    http = requests.Session()
    http.trust_env = False  # the proxy's own address: never through an HTTP proxy from the environment
    try:
        answer = http.get(url, headers=headers, timeout=STATUS_TIMEOUT_S)
    except requests.ConnectionError:
        return fail(f"no proxy is answering at {url} (is it running? start it with: python proxy.py)")
    except requests.Timeout:
        return fail(f"the proxy at {url} did not answer within {STATUS_TIMEOUT_S:g}s")
    if answer.status_code in (401, 403):
        return fail(f"the proxy at {url} refused the admin key from {settings.api_tokens_path} "
                    f"({answer.status_code}: {error_message(answer)})")
    if answer.status_code != 200:
        return fail(f"the proxy at {url} answered {answer.status_code}: {error_message(answer)}")
    try:
        status: dict[str, Any] = answer.json()
        models: list[dict[str, Any]] = status["models"]
    except (ValueError, KeyError, TypeError):
        return fail(f"the server at {url} answered something that is not the proxy's /status")
    loaded = [model for model in models if model.get("state") != "stopped"]
    print(f"proxy {status.get('version', '?')} at {url.removesuffix('/status')}, up {span(status.get('uptime_s'))}; "
          f"{len(loaded)} of {len(models)} models loaded")
    if not loaded:
        print("no model is loaded")
        return 0
    rows = [[model["name"], model["state"], str(model["pid"] or "-"), str(model["leases"]), str(model["queued"]),
             expires_in(model), memory(model.get("memory") or {})] for model in loaded]
    print(table(["model", "state", "pid", "leases", "queued", "expires in", "memory"], rows, right=range(2, 5)))
    return 0


# ----- formatting ----------------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Return rows under their headers, columns padded to their widest cell (`right` ones right-aligned)."""
    widths = [max(len(str(row[column])) for row in [headers, *rows]) for column in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(cell).rjust(width) if column in right else str(cell).ljust(width)
                         for column, (cell, width) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def utc_minute(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%d %H:%M")


def span(value: object) -> str:
    """Return seconds as "2h 03m", "4m 58s" or "12s"."""
    if not isinstance(value, int | float):
        return "?"
    total = int(value)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def expires_in(model: dict[str, Any]) -> str:
    """Return when an idle model unloads: a span, `never`, or `in use` while it holds leases."""
    if model.get("expires_at"):
        expires = datetime.fromisoformat(model["expires_at"])
        return span(max(0.0, expires.timestamp() - time.time()))
    if model.get("state") == "ready" and model.get("leases"):
        return "in use"
    if model.get("state") == "ready" and model.get("keep_alive_s") is None:
        return "never"
    return "-"


def memory(placement: dict[str, int]) -> str:
    return ", ".join(f"{device} {format_size(size)}" for device, size in sorted(placement.items())) or "-"


def connect_host(host: str) -> str:
    """Return the address to reach a proxy listening on `host` (a wildcard is reached on loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def error_message(answer: requests.Response) -> str:
    try:
        error = answer.json().get("error")
    except ValueError:
        return answer.text[:200] or answer.reason
    message = error.get("message") if isinstance(error, dict) else error
    return str(message or answer.reason)


def fail(message: str, *, status: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status
