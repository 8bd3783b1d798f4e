"""The HTTP server: waitress with the proxy's connection limits, timeouts and buffer bounds, plus
the three things waitress 3.0 lacks: a write timeout for clients that stop reading, deadlines for
requests still arriving, and refusing a body before it is buffered (no key; Content-Length with
Transfer-Encoding). Only install_hooks() touches waitress's internals.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import resource
import select
import time
import weakref
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

import waitress
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer
from waitress.task import WSGITask
from waitress.utilities import Error as WaitressError

from proxy.auth import Keys, keyless_entry
from proxy.config import ProxySettings
from proxy.errors import (
    BadRequest,
    ProxyError,
    Unauthorized,
    anthropic_error_body,
    ollama_error_body,
    openai_error_body,
)

log = logging.getLogger(__name__)
access_log = logging.getLogger("proxy.access")

OUTBUF_HIGH_WATERMARK = 256 * 1024  # a response's writer waits while more than this is unsent (waitress: 16 MiB)
OUTBUF_OVERFLOW = 1024 * 1024       # unsent output beyond this goes to a temporary file, not memory
INBUF_OVERFLOW = 512 * 1024         # likewise for a request body still arriving
MAX_HEADER_BYTES = 64 * 1024        # request line and headers (waitress: 256 KiB)
CHECK_INTERVAL_S = 1                # how often the timeouts are checked (waitress's cleanup_interval)

WSGIApp = Callable[..., Any]
KeysSource = Callable[[], Keys]     # the keys in force now: a reload replaces them


def create_server(app: WSGIApp, settings: ProxySettings, keys: KeysSource) -> Any:
    """Return a waitress server for the app, bound and listening but not yet running."""
    _raise_open_files_limit(settings.connection_limit)
    server = waitress.create_server(
        app, host=settings.host, port=settings.port, threads=settings.threads, ident="model-proxy",
        # waitress's send_bytes (deprecated) is 1 by default: every chunk leaves at once, tokens are never held back
        channel_request_lookahead=1,  # lets waitress notice a client that leaves while its request waits
        # A backstop above Flask's limit, which answers 413 in each route's own error shape.
        max_request_body_size=int(settings.max_body_mb * 1024 * 1024) * 2 + 1024 * 1024,
        max_request_header_size=MAX_HEADER_BYTES,
        connection_limit=settings.connection_limit,
        channel_timeout=math.ceil(settings.channel_timeout_s),  # idle keep-alive connections
        cleanup_interval=CHECK_INTERVAL_S,
        outbuf_high_watermark=OUTBUF_HIGH_WATERMARK,
        outbuf_overflow=OUTBUF_OVERFLOW,
        inbuf_overflow=INBUF_OVERFLOW,
        asyncore_use_poll=True,  # select() fails on descriptors >= 1024 and the server loop dies with it
    )
    install_hooks(server, settings, keys)
    return server


def install_hooks(server: Any, settings: ProxySettings, keys: KeysSource) -> None:
    """Add a write timeout, arrival deadlines and the early body check to a waitress 3.0 server.

    waitress offers no supported hook for any of them, so this is the one place that relies on
    its internals: HTTPChannel.parser_class and task_class (KeepAliveTask: keep-alive after streams),
    the parser's received() and header fields, the
    server's channel_class, maintenance() and active_channels, and a channel's addr, requests,
    total_outbufs_len, last_activity and will_close. It raises RuntimeError at startup when any
    of them is missing (tests/test_server_hooks.py checks the same).
    """
    listeners = _listeners(server)
    _require_internals(listeners)
    screen = _screen(keys, settings.loopback_without_key)

    class Parser(HTTPRequestParser):  # type: ignore[misc]  # waitress is untyped
        error: Any  # waitress's: the error to answer with instead of running the app

        def __init__(self, adj: Any, peer: str | None = None) -> None:
            super().__init__(adj)
            self.peer = peer  # the client's socket address (what REMOTE_ADDR will say), for the early key check
            self.arrived_at = time.monotonic()  # waitress makes a parser when a request's first byte arrives
            self.headers_at: float | None = None

        def received(self, data: bytes) -> int:
            consumed: int = super().received(data)
            if self.headers_finished and self.headers_at is None:
                self.headers_at = time.monotonic()
                refusal = None if self.error is not None else screen(self)
                if refusal is not None:  # answered now, then the connection closes: the body is never read
                    self.error, self.completed, self.expect_continue = refusal, True, False
            return consumed

    class Channel(HTTPChannel):  # type: ignore[misc]  # waitress is untyped
        parser_class: Callable[..., Any] = Parser  # a class here; per channel a partial that adds the peer
        task_class = KeepAliveTask

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # waitress makes each request's parser with self.parser_class(self.adj): this one knows the peer.
            peer = self.addr[0] if isinstance(self.addr, tuple) and self.addr else None
            self.parser_class = functools.partial(Parser, peer=peer)

    for listener in listeners:
        listener.channel_class = Channel
        listener.maintenance = _with_deadlines(listener, listener.maintenance, settings)


class KeepAliveTask(WSGITask):  # type: ignore[misc]  # waitress is untyped
    """waitress's task, keeping an HTTP/1.1 connection open after a chunked answer (every stream).

    waitress closes the connection after any answer without a Content-Length, although the final
    chunk marks the end of a chunked one: a client that streams every call (an agent) then
    reconnects for every call. The connection still closes when the client asks, for HTTP/1.0,
    when the app fails mid-answer (waitress then sends no final chunk: the client sees the cut),
    and when the client has gone.
    """

    _building_header = False

    def build_response_header(self) -> bytes:
        self._building_header = True
        try:
            header: bytes = super().build_response_header()
            return header
        finally:
            self._building_header = False

    def set_close_on_finish(self) -> None:
        if self._building_header and self.chunked_response and self.version == "1.1":
            return  # the only close waitress decides after chunking: the client's own `close` came before it
        super().set_close_on_finish()


def _with_deadlines(listener: Any, maintenance: Callable[[float], None],
                    settings: ProxySettings) -> Callable[[float], None]:
    """Wrap waitress's maintenance (it closes idle connections) to also close stalled ones.

    waitress's own way, will_close, waits for the socket to become writable, which a client that
    reads nothing never lets happen; so the channel is closed outright. Not from here, though:
    maintenance runs while the loop is collecting sockets to select on, and a socket closed then
    would be selected on anyway (EBADF). The trigger runs the close after the select instead.
    """
    closing: weakref.WeakSet[Any] = weakref.WeakSet()

    def close(channel: Any) -> None:
        closing.discard(channel)
        if channel.socket is not None:  # not closed meanwhile
            channel.handle_close()  # wakes a writer blocked on it, which gets ClientDisconnected

    def maintain(now: float) -> None:
        maintenance(now)
        monotonic = time.monotonic()
        for channel in list(listener.active_channels.values()):
            reason = None if channel in closing else _stalled(channel, now, monotonic, settings)
            if reason is not None:
                closing.add(channel)
                listener.trigger.pull_trigger(functools.partial(close, channel))
                address = f"{channel.addr[0]}:{channel.addr[1]}" if isinstance(channel.addr, tuple) else "-"
                (log.warning if channel.requests else log.info)("client %s: %s; connection closed", address, reason)

    return maintain


def _stalled(channel: Any, now: float, monotonic: float, settings: ProxySettings) -> str | None:
    """Return why a connection must be closed now, or None. `now` is waitress's clock (time.time())."""
    if (channel.total_outbufs_len and now - channel.last_activity > settings.client_timeout_s
            and not _has_room(channel.socket)):  # room means the client reads and this loop is behind
        path = channel.requests[0].path if channel.requests else "-"
        return (f"accepted no byte of its answer to {path} for {settings.client_timeout_s:g}s "
                "(proxy.client_timeout); its stream is cut and its model's lease released")
    partial = channel.request
    if channel.requests or partial is None or partial.completed or not hasattr(partial, "arrived_at"):
        return None
    if partial.headers_at is None and monotonic - partial.arrived_at > settings.header_timeout_s:
        return f"request headers still incomplete after {settings.header_timeout_s:g}s (proxy.header_timeout)"
    if partial.headers_at is not None and monotonic - partial.headers_at > settings.body_timeout_s:
        return f"request body still incomplete after {settings.body_timeout_s:g}s (proxy.body_timeout)"
    return None


def _has_room(sock: Any) -> bool:
    """Say whether a socket can take more bytes now (poll, not select: descriptors may pass 1024)."""
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    events = poller.poll(0)
    return bool(events) and bool(events[0][1] & select.POLLOUT) and not events[0][1] & (select.POLLERR | select.POLLHUP)


class _Refusal(WaitressError):  # type: ignore[misc]  # waitress is untyped
    """A request answered from its headers alone, in its route's own error shape (waitress closes after it)."""

    def __init__(self, error: ProxyError, path: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.path = path

    def to_response(self, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
        error = self.error
        if self.path.startswith("/api/"):
            shape = ollama_error_body(error)
        elif self.path.startswith("/v1/messages"):
            shape = anthropic_error_body(error)
        else:
            shape = openai_error_body(error)
        headers = [("Content-Type", "application/json"), *error.headers().items()]
        return f"{error.status} {HTTPStatus(error.status).phrase}", headers, json.dumps(shape).encode()


def _screen(keys: KeysSource, loopback_without_key: bool = False) -> Callable[[Any], _Refusal | None]:
    """Return the check run on each request's headers before any of its body is read.

    With proxy.loopback_without_key, a keyless body from a loopback peer passes, as the app lets it.
    """

    def screen(request: Any) -> _Refusal | None:
        headers: Mapping[str, str] = request.headers  # upper case, "_" for "-"
        error: ProxyError | None = None
        if "CONTENT_LENGTH" in headers and (request.chunked or "TRANSFER_ENCODING" in headers):
            # RFC 9112 section 6.3: a likely request-smuggling attempt; refuse it and close.
            error = BadRequest("a request may not carry both Content-Length and Transfer-Encoding")
        elif request.chunked or request.content_length > 0:
            try:
                keys().check({"Authorization": headers.get("AUTHORIZATION", ""),
                              "x-api-key": headers.get("X_API_KEY", ""),
                              "x-admin-key": headers.get("X_ADMIN_KEY", "")},
                             keyless=keyless_entry(loopback_without_key, getattr(request, "peer", None)))
            except Unauthorized as exc:  # never buffer a body nobody is allowed to send
                error = exc
        if error is None:
            return None
        access_log.info("%s %s %d model=- key=- refused before its body was read: %s",
                        request.command, request.path, error.status, error.message)
        return _Refusal(error, request.path)

    return screen


def _listeners(server: Any) -> list[Any]:
    """Return the listening servers: the server itself, or each one a multi-address server holds."""
    if isinstance(server, BaseWSGIServer):
        return [server]
    return [item for item in getattr(server, "map", {}).values() if isinstance(item, BaseWSGIServer)]


def _require_internals(listeners: list[Any]) -> None:
    missing = [f"HTTPChannel.{name}" for name in ("parser_class", "task_class", "request", "addr",
                                                  "total_outbufs_len", "last_activity", "will_close")
               if not hasattr(HTTPChannel, name)]
    missing += [f"WSGITask.{name}" for name in ("build_response_header", "set_close_on_finish", "chunked_response")
                if not hasattr(WSGITask, name)]
    missing += [f"HTTPRequestParser.{name}" for name in ("received", "headers_finished", "completed", "chunked",
                                                         "content_length", "error", "expect_continue")
                if not hasattr(HTTPRequestParser, name)]
    missing += [f"server.{name}" for listener in listeners[:1]
                for name in ("channel_class", "maintenance", "active_channels") if not hasattr(listener, name)]
    if not listeners:
        missing.append("a listening server")
    if missing:
        raise RuntimeError(f"this waitress lacks {', '.join(missing)}, which proxy/server.py relies on; "
                           "install the version requirements.txt pins")


def _raise_open_files_limit(connection_limit: int) -> None:
    """Raise the soft limit on open files toward the hard one: each connection takes a descriptor or more."""
    wanted = 2 * connection_limit + 256  # a socket each, a temporary file for some, the backends and logs
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            log.warning("open files are limited to %d (ulimit -n); proxy.connection_limit %d wants about %d",
                        target, connection_limit, wanted)
