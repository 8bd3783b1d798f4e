"""The one exchange path every dialect's routes take to a backend and back.

A route reads and translates the request (pipeline.py prepares it: model, keep_alive, template);
run() takes the lease and sends it, watching for a client that leaves while it waits; the route's
answer function then relays the backend's answer through the dialect's stream transform, or gathers
it whole. However it ends, the backend request is closed and the lease released, exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from flask import Response, request

from proxy.app_context import ProxyContext
from proxy.dialects.backend import error_message_from_upstream
from proxy.errors import ProxyError, UpstreamError
from proxy.manager import Lease
from proxy.pipeline import Prepared
from proxy.streaming import StreamTransform, relay, transformed
from proxy.upstream import RawBody, Upstream

log = logging.getLogger(__name__)

ErrorEvent = Callable[[ProxyError], bytes]
"""Frame an error that happens after the answer began, in the dialect's own in-band shape."""


def json_body() -> Any:
    """Return the request's JSON body, parsed once and strictly (see app.StrictJSON); None when the
    body is missing or is not JSON (each dialect words that error its own way)."""
    return request.get_json(force=True, silent=True)


class Opened:
    """A backend answer in progress and the lease it holds; close() ends both, once."""

    def __init__(self, upstream: Upstream, lease: Lease, response: Any) -> None:
        self._upstream = upstream
        self.lease = lease
        self.response = response
        self.status: int = response.status_code
        self.content_type: str = response.headers.get("Content-Type", "application/json")
        declared = response.headers.get("Content-Length", "")
        self.declared_length: int | None = int(declared) if declared.isdigit() else None

    @property
    def is_sse(self) -> bool:
        return self.content_type.startswith("text/event-stream")

    def chunks(self) -> Iterator[bytes]:
        """Yield the answer as it arrives; a break becomes BackendFailed/BackendTimeout/ClientGone."""
        return self._upstream.iter_body(self.lease, self.response)

    def read(self) -> bytes:
        """Return the whole answer (at most proxy.max_answer_mb) and close."""
        try:
            return self._upstream.read(self.lease, self.response)
        finally:
            self.close()

    def check_status(self) -> None:
        """Raise the backend's error with its status (the message prefixed with the model for 5xx)."""
        if self.status == 200:
            return
        message = error_message_from_upstream(self.read(), self.status)
        raise UpstreamError(self.status, f"{self.lease.model_name}: {message}" if self.status >= 500 else message)

    def close(self) -> None:
        try:
            self.response.close()
        finally:
            self.lease.release()  # idempotent


T = TypeVar("T")


def run(prepared: Prepared, path: str, answer: Callable[[Opened], T], *, raw: RawBody | None = None) -> T:
    """Take a lease on the prepared request's model, send it to `path`, and return answer(opened).

    The body sent is prepared.body as JSON, or `raw` as the client sent it (pass-through routes).

    While it runs, a client that leaves cuts the backend request (ClientGone, 499). If answer()
    raises, the backend request is closed and the lease released; a streamed answer's body does
    that itself when it ends (see relay_answer).
    """
    context = ProxyContext.current()
    request.environ["proxy.model"] = prepared.model.name
    cancelled = request.environ.get("waitress.client_disconnected")  # see proxy/server.py
    with context.upstream.watching(cancelled):
        lease = context.manager.acquire(prepared.model.name, prepared.keep_alive_s, cancelled=cancelled)
        request.environ["proxy.lease"] = lease  # its wait, and when it was granted, for the operator's view
        try:
            response = (context.upstream.post(lease, path, prepared.body) if raw is None
                        else context.upstream.post_raw(lease, path, raw))
        except BaseException:
            lease.release()
            raise
        opened = Opened(context.upstream, lease, response)
        try:
            return answer(opened)
        except BaseException:
            opened.close()
            raise


def relay_answer(opened: Opened, transform: StreamTransform | None, error_event: ErrorEvent, *,
                 content_type: str, headers: Mapping[str, str] | None = None) -> Response:
    """Answer with the backend's bytes as they arrive, through the transform when there is one.

    A backend that breaks off, or an in-band error the transform raises, ends the answer with
    error_event's bytes; the backend request is closed and the lease released however it ends.
    """
    chunks = opened.chunks()
    if transform is not None:
        chunks = transformed(chunks, transform)
    environ = request.environ

    def noted(error: ProxyError) -> bytes:  # an in-band error: the access log and the operator's view see its code
        environ["proxy.error"] = error.code
        return error_event(error)

    body = relay(chunks, opened.response.close, opened.lease, noted)
    return Response(body, status=opened.status, content_type=content_type, headers=dict(headers or {}))


def gather(opened: Opened, transform: StreamTransform) -> None:
    """Feed the whole answer through the transform, then close; at most proxy.max_answer_mb of it.

    For answers a dialect must hold whole (Ollama's non-stream chat); a larger one is a 502.
    """
    limit = ProxyContext.current().upstream.max_answer_bytes
    try:
        held = 0
        for chunk in opened.chunks():
            held += len(chunk)
            if held > limit:
                raise UpstreamError(502, f"{opened.lease.model_name}: the answer is larger than "
                                         f"{limit / 1048576:g} MiB, the most the proxy holds to gather one answer "
                                         "(proxy.max_answer_mb); stream it instead")
            transform.feed(chunk)
        transform.flush()
    finally:
        opened.close()
