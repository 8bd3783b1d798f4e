"""GET /metrics: the Prometheus exposition of proxy/metrics.py, behind a key unless proxy.metrics_public.

A scrape reads counters and the manager's snapshot: it never loads a model or touches an idle timer.
"""

from __future__ import annotations

from flask import Blueprint, Response

from proxy.app_context import ProxyContext
from proxy.errors import ProxyError, render_openai_error
from proxy.metrics import CONTENT_TYPE

bp = Blueprint("metrics", __name__)


@bp.errorhandler(ProxyError)
def render_error(error: ProxyError) -> Response:
    return render_openai_error(error)


@bp.get("/metrics")
def metrics() -> Response:
    context = ProxyContext.current()
    if not context.config.proxy.metrics_public:
        context.authorize()
    return Response(context.metrics.render(), content_type=CONTENT_TYPE)
