"""The one exchange path every dialect's routes take to a backend and back.

A route reads and translates the request (pipeline.py prepares it: model, keep_alive, template);
run() takes the lease and sends it, watching for a client that leaves while it waits; the route's
answer function then relays the backend's answer through the dialect's stream transform, or gathers
it whole. However it ends, the backend request is closed and the lease released, exactly once; a
backend that could not be reached or broke off is told (Lease.report_failure), so a gone remote is
checked anew by the next request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from flask import Response, request

from proxy.app_context import ProxyContext
from proxy.dialects.backend import error_message_from_upstream
from proxy.errors import BackendFailed, BackendTimeout, ProxyError, UpstreamError, sse_error_event
from proxy.manager import Lease, ModelManager
from proxy.pipeline import Prepared
from proxy.progress import PROGRESS_EVERY_S, progress_text
from proxy.streaming import StreamTransform, relay, transformed
from proxy.upstream import RawBody, Upstream, close_response

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
        self.status: int = response.status
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
        except ProxyError as error:
            report(self.lease, error)
            raise
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
            close_response(self.response)
        finally:
            self.lease.release()  # idempotent


T = TypeVar("T")


def report(lease: Lease, error: BaseException) -> None:
    """Tell the backend when a request could not reach it, or lost it mid-answer (see Lease.report_failure)."""
    if isinstance(error, BackendFailed | BackendTimeout):
        lease.report_failure()


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
        return _answer_with(lease, prepared, path, answer, raw)


def _answer_with(lease: Lease, prepared: Prepared, path: str, answer: Callable[[Opened], T],
                 raw: RawBody | None = None) -> T:
    """Send the prepared request on a lease just granted and return answer(opened) (see run)."""
    context = ProxyContext.current()
    request.environ["proxy.lease"] = lease  # its wait, and when it was granted, for the operator's view
    try:
        response = (context.upstream.post(lease, path, prepared.body) if raw is None
                    else context.upstream.post_raw(lease, path, raw))
    except BaseException as error:
        try:
            report(lease, error)
        finally:
            lease.release()
        raise
    opened = Opened(context.upstream, lease, response)
    try:
        refuse_a_refused_key(opened)
        return answer(opened)
    except BaseException:
        opened.close()
        raise


def refuse_a_refused_key(opened: Opened) -> None:
    """Raise BackendFailed (502) when a server elsewhere answers 401 or 403: it refused this proxy's key,
    not the client's, whose own was fine. The server is checked again (Lease.report_failure)."""
    model = opened.lease.model
    if opened.status not in (401, 403) or model.remote is None:
        return
    where = f"peer {model.remote.peer}" if model.remote.peer else "the remote server"
    error = BackendFailed(f"{model.name}: {where} at {opened.lease.base_url} refused the proxy's key "
                          f"(HTTP {opened.status})")
    report(opened.lease, error)
    raise error


def run_with_progress(prepared: Prepared, path: str, answer: Callable[[Opened], Response],
                      transform: StreamTransform | None, frame: Callable[[str], bytes],
                      headers: Mapping[str, str]) -> Response:
    """Like run() for an OpenAI stream whose model is not ready: the stream opens at once and gets a
    progress frame every second while the model loads or waits for room, then the answer's events.

    A refusal that comes at once (the queue is full, the model can never fit) is still an HTTP error,
    and a lease that comes at once takes run()'s path. Later errors, and a backend error status, end
    the stream in-band. A client that leaves while waiting leaves the queue; a lease granted after it
    left is released at once.
    """
    context = ProxyContext.current()
    environ = request.environ
    environ["proxy.model"] = prepared.model.name
    cancelled = environ.get("waitress.client_disconnected")
    waiter = _Waiter(context.manager, prepared, cancelled)
    if waiter.done.wait(FIRST_WAIT_S):
        with context.upstream.watching(cancelled):
            return _answer_with(waiter.lease(), prepared, path, answer)

    def body() -> Iterator[bytes]:
        opened: Opened | None = None
        lease: Lease | None = None
        started = time.monotonic()
        try:
            while not waiter.done.wait(PROGRESS_EVERY_S):
                yield frame(progress_text(context.manager.status(prepared.model.name), time.monotonic() - started))
            lease = waiter.lease()
            environ["proxy.lease"] = lease
            with context.upstream.watching(cancelled):
                opened = Opened(context.upstream, lease, context.upstream.post(lease, path, prepared.body))
            refuse_a_refused_key(opened)
            if opened.status != 200 or not opened.is_sse:
                message = error_message_from_upstream(opened.read(), opened.status)
                raise UpstreamError(opened.status, f"{lease.model_name}: {message}")
            chunks = opened.chunks()
            for number, chunk in enumerate(transformed(chunks, transform) if transform is not None else chunks):
                if not number:  # after the progress frames: where the answer's time to first token ends
                    environ["proxy.first_byte_at"] = time.monotonic()
                yield chunk
        except ProxyError as error:
            environ["proxy.error"] = error.code
            log.warning("stream ended early: %s", error.message)
            if lease is not None:
                report(lease, error)
            yield sse_error_event(error)
        finally:
            if opened is not None:
                opened.close()
            waiter.abandon()

    return Response(body(), status=200, content_type="text/event-stream", headers=dict(headers))


FIRST_WAIT_S = 0.05  # a lease or a refusal within this time needs no progress


class _Waiter:
    """A thread that waits for a lease for a stream that is already open; the stream reads it."""

    def __init__(self, manager: ModelManager, prepared: Prepared, cancelled: Callable[[], bool] | None) -> None:
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._lease: Lease | None = None
        self._error: BaseException | None = None
        self._abandoned = False
        self._taken = False
        threading.Thread(target=self._acquire, args=(manager, prepared, cancelled), name="lease-waiter",
                         daemon=True).start()

    def _acquire(self, manager: ModelManager, prepared: Prepared, cancelled: Callable[[], bool] | None) -> None:
        try:
            lease = manager.acquire(prepared.model.name, prepared.keep_alive_s,
                                    cancelled=lambda: self._abandoned or bool(cancelled and cancelled()))
        except BaseException as exc:
            self._error = exc
        else:
            with self._lock:
                self._lease = lease
                if self._abandoned:  # the stream has ended: nobody will use it
                    lease.release()
        finally:
            self.done.set()

    def lease(self) -> Lease:
        """Return the lease (once done), or raise what acquire raised."""
        if self._error is not None:
            raise self._error
        with self._lock:
            assert self._lease is not None
            self._taken = True
            return self._lease

    def abandon(self) -> None:
        """The stream has ended: leave the queue, and release a lease nobody took."""
        with self._lock:
            self._abandoned = True
            if self._lease is not None and not self._taken:
                self._lease.release()


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
        report(opened.lease, error)
        return error_event(error)

    body = relay(chunks, lambda: close_response(opened.response), opened.lease, noted)
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
    except ProxyError as error:
        report(opened.lease, error)
        raise
    finally:
        opened.close()
