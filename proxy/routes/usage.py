"""GET /usage (admin key): requests, errors, tokens and latency per key, model or UTC day over a window,
read from the request log (proxy/request_log.py). It only reads; errors in OpenAI's shape.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from proxy.app_context import ProxyContext
from proxy.errors import BadRequest, Disabled, ProxyError, Unavailable, render_openai_error
from proxy.request_log import GROUPINGS, RequestLog, parse_window
from proxy.request_stores import StoreError

bp = Blueprint("usage", __name__)

DEFAULT_SINCE = "7d"
DEFAULT_BY = "model"


@bp.errorhandler(ProxyError)
def render_error(error: ProxyError) -> Response:
    return render_openai_error(error)


@bp.get("/usage")
def usage() -> Response:
    """`?since=7d&by=model`: one entry per group, busiest first (days oldest first)."""
    context = ProxyContext.current()
    context.authorize(admin=True)
    since = request.args.get("since", DEFAULT_SINCE)
    try:
        since_s = parse_window(since)
    except ValueError as exc:
        raise BadRequest(f"since: {exc}", param="since") from None
    by = request.args.get("by", DEFAULT_BY)
    if by not in GROUPINGS:
        raise BadRequest(f"by: expected one of {', '.join(GROUPINGS)}, got {by!r}", param="by")
    # ProxyContext.request_log: the log proxy.py opened, None when proxy.request_log is off.
    log: RequestLog | None = context.request_log
    if log is None:
        raise Disabled("the request log is off (proxy.request_log): set it to sqlite, an SQLite file or a "
                       "postgresql:// URL and restart the proxy")
    try:
        groups = log.usage(since_s, by)
    except StoreError as exc:  # its message names the store, a URL's password masked
        raise Unavailable(f"the request log cannot be read now: {exc}") from None
    return jsonify({"since": since, "since_s": since_s, "by": by, "usage": groups, "dropped": log.dropped})
