"""A minimal HTTP/1.1 client on raw sockets, built to measure rather than to be general.

While a response arrives the client only receives and timestamps bytes (one `recv` and one clock
read per arrival), so the client spends as little CPU as possible while the thing under test
runs: this machine has two cores, shared by the client, the proxy and the backend. Chunked bodies
and SSE events are decoded afterwards, and every event gets the time of the `recv` that completed it.

`Connection` runs sequential requests over one keep-alive connection, as a real client does;
`run_streams` runs many streams at once from one thread with a selector (64 client threads
would fight over the GIL and measure themselves).
"""

from __future__ import annotations

import bisect
import json
import re
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Any

RECV_BYTES = 1 << 18
EVENT_END = re.compile(rb"\r?\n\r?\n")
CONTENT = re.compile(rb'"(?:content|text)":\s*"[^"]')  # an event that carries text (not the empty role delta)
SENT_AT = re.compile(rb'"x_t":([0-9.]+)')               # the synthetic server's send time (time.monotonic)
CHUNKED_END = b"\r\n0\r\n\r\n"


class HttpError(Exception):
    """The connection broke or the response was not HTTP."""


@dataclass(slots=True)
class Reply:
    """A whole response (non-streamed use)."""

    status: int
    body: bytes
    elapsed_s: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(slots=True)
class StreamReply:
    """A streamed SSE response, decoded after it ended. Times are time.monotonic() values."""

    status: int
    started: float
    ended: float
    events: int                      # data events, [DONE] included
    payload_bytes: int               # the decoded body
    wire_bytes: int                  # the body as received (chunk framing included)
    done: bool                       # saw data: [DONE]
    error: str | None                # transport error, HTTP error, in-band error event, truncation
    ttft_s: float | None             # until the first event that carries text
    first_event_s: float | None = None  # until the first data event (after any SSE comments: load progress)
    arrivals: list[float] = field(default_factory=list)   # per data event (timed=True only)
    sent_at: list[float] = field(default_factory=list)    # x_t per data event that has one (timed=True)
    text: str = ""                   # the streamed text (collect_text=True only)

    @property
    def duration_s(self) -> float:
        return self.ended - self.started

    @property
    def ok(self) -> bool:
        return self.error is None


class _Exchange:
    """One response as it arrives: headers parsed at once, the body kept raw with arrival times."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.ended = started
        self._head = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.mode = ""                # chunked, length or eof
        self._length = 0
        self.parts: list[bytes] = []
        self.times: list[float] = []  # arrival time of each part
        self.ends: list[int] = []     # body bytes received after each part
        self.size = 0
        self._tail = b""
        self.complete = False
        self.error: str | None = None

    def feed(self, data: bytes, now: float) -> None:
        if not self.status:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 65536:
                    raise HttpError("response headers too long")
                return
            self._parse_head(self._head[:end])
            data, self._head = self._head[end + 4:], b""
        if data:
            self.parts.append(data)
            self.size += len(data)
            self.times.append(now)
            self.ends.append(self.size)
        if self.mode == "chunked":
            self._tail = (self._tail + data)[-len(CHUNKED_END):]
            if self._tail.endswith(CHUNKED_END) or (self.size == 5 and self._tail == b"0\r\n\r\n"):
                self.complete = True
        elif self.mode == "length":
            self.complete = self.size >= self._length
        if self.complete:
            self.ended = now

    def eof(self, now: float) -> None:
        self.ended = now
        if self.mode == "eof" and self.status:
            self.complete = True
        elif not self.complete:
            self.error = "the server closed the connection before the response ended"

    def _parse_head(self, head: bytes) -> None:
        status_line, *lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP response: {status_line[:80]!r}")
        self.status = int(parts[1])
        for line in lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self.mode = "chunked"
        elif "content-length" in self.headers:
            self.mode, self._length = "length", int(self.headers["content-length"])
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self.mode, self._length = "length", 0
        else:
            self.mode = "eof"

    @property
    def reusable(self) -> bool:
        return self.complete and self.error is None and self.headers.get("connection", "").lower() != "close"

    def raw(self) -> bytes:
        return b"".join(self.parts)

    def body(self) -> bytes:
        raw = self.raw()
        return _decode_chunked(raw)[0] if self.mode == "chunked" else raw

    def stream_reply(self, *, timed: bool = False, collect_text: bool = False) -> StreamReply:
        """Decode the body into SSE events and time each one by the recv that completed it."""
        raw = self.raw()
        if self.mode == "chunked":
            payload, table, finished = _decode_chunked(raw)
        else:
            payload, table, finished = raw, [(0, 0)], self.complete
        error = self.error
        if error is None and not finished:
            error = "the response body ended early"
        if error is None and self.status != 200:
            error = f"HTTP {self.status}: {payload[:300].decode('utf-8', 'replace')}"
        payload_starts = [entry[0] for entry in table]
        events = 0
        done = False
        ttft: float | None = None
        first_event: float | None = None
        arrivals: list[float] = []
        sent_at: list[float] = []
        texts: list[str] = []
        start = 0
        for match in EVENT_END.finditer(payload):
            event = payload[start:match.start()]
            start = match.end()
            data = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
            if not data and not event.startswith(b"data:"):
                continue  # a comment or an empty event
            events += 1
            if data == b"[DONE]":
                done = True
                continue
            if data.startswith(b'{"error"') and error is None:
                error = "in-band error event: " + data[:300].decode("utf-8", "replace")
            wants_time = timed or first_event is None or (ttft is None and CONTENT.search(data) is not None)
            if not wants_time:
                if collect_text:
                    texts.append(_event_text(data))
                continue
            index = bisect.bisect_right(payload_starts, match.end() - 1) - 1
            chunk_payload_start, chunk_raw_start = table[max(index, 0)]
            raw_offset = chunk_raw_start + (match.end() - chunk_payload_start)
            arrived = self.times[min(bisect.bisect_left(self.ends, raw_offset), len(self.times) - 1)]
            if first_event is None:
                first_event = arrived - self.started
            if ttft is None and CONTENT.search(data) is not None:
                ttft = arrived - self.started
            if timed:
                arrivals.append(arrived)
                stamp = SENT_AT.search(data)
                if stamp is not None:
                    sent_at.append(float(stamp.group(1)))
            if collect_text:
                texts.append(_event_text(data))
        if error is None and self.status == 200 and not done:
            error = "the stream ended without data: [DONE]"
        return StreamReply(status=self.status, started=self.started, ended=self.ended, events=events,
                           payload_bytes=len(payload), wire_bytes=len(raw), done=done, error=error, ttft_s=ttft,
                           first_event_s=first_event,
                           arrivals=arrivals, sent_at=sent_at, text="".join(texts))


def _event_text(data: bytes) -> str:
    try:
        event = json.loads(data)
        choice = event["choices"][0]
        return str((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""


def _decode_chunked(raw: bytes) -> tuple[bytes, list[tuple[int, int]], bool]:
    """Return (payload, [(payload offset, raw offset) of each chunk's data], whether the last chunk came)."""
    parts: list[bytes] = []
    table: list[tuple[int, int]] = []
    position = 0
    payload_size = 0
    while True:
        line_end = raw.find(b"\r\n", position)
        if line_end < 0:
            return b"".join(parts), table or [(0, 0)], False
        try:
            size = int(raw[position:line_end].split(b";")[0], 16)
        except ValueError:
            return b"".join(parts), table or [(0, 0)], False
        position = line_end + 2
        if size == 0:
            return b"".join(parts), table or [(0, 0)], True
        table.append((payload_size, position))
        data = raw[position:position + size]
        parts.append(data)
        payload_size += len(data)
        if len(data) < size:
            return b"".join(parts), table, False
        position += size + 2


def _request_bytes(method: str, path: str, port: int, body: Any) -> bytes:
    data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n"
    if body is not None or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return head.encode() + b"\r\n" + data


def _connect(port: int, timeout_s: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Connection:
    """Sequential requests over one keep-alive connection (reconnects when the server closed it).

    `connects` counts the TCP connections it opened, the first one included.
    """

    def __init__(self, port: int, timeout_s: float = 120.0) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self.connects = 0
        self._sock: socket.socket | None = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: Any = None) -> Reply:
        exchange = self._exchange(method, path, body)
        if exchange.error is not None:
            raise HttpError(exchange.error)
        return Reply(exchange.status, exchange.body(), exchange.ended - exchange.started)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Reply:
        return self.request("POST", path, body)

    def stream(self, path: str, body: Any, *, timed: bool = False, collect_text: bool = False) -> StreamReply:
        """POST and read a streamed answer; errors are reported in the reply, never raised."""
        try:
            exchange = self._exchange("POST", path, body)
        except (OSError, HttpError) as exc:
            now = time.monotonic()
            return StreamReply(status=0, started=now, ended=now, events=0, payload_bytes=0, wire_bytes=0,
                               done=False, error=f"{type(exc).__name__}: {exc}", ttft_s=None)
        return exchange.stream_reply(timed=timed, collect_text=collect_text)

    def _exchange(self, method: str, path: str, body: Any) -> _Exchange:
        request = _request_bytes(method, path, self.port, body)
        for attempt in (1, 2):
            reused = self._sock is not None
            if self._sock is None:
                self._sock = _connect(self.port, self.timeout_s)
                self.connects += 1
            sock = self._sock
            exchange = _Exchange(time.monotonic())
            try:
                sock.sendall(request)
                while not exchange.complete:
                    data = sock.recv(RECV_BYTES)
                    now = time.monotonic()
                    if not data:
                        exchange.eof(now)
                        break
                    exchange.feed(data, now)
            except OSError as exc:
                exchange.error = f"{type(exc).__name__}: {exc}"
            if not exchange.reusable:
                self.close()
            # A keep-alive connection the server had already closed: try once on a fresh one.
            if reused and attempt == 1 and not exchange.status and exchange.error is not None:
                continue
            return exchange
        raise AssertionError("unreachable")


def run_streams(port: int, path: str, bodies: list[Any], timeout_s: float = 120.0) -> list[StreamReply]:
    """Open one connection per body, send every request, then read all the streams at once."""
    selector = selectors.DefaultSelector()
    exchanges: list[_Exchange] = []
    sockets: list[socket.socket] = []
    try:
        for body in bodies:
            exchange = _Exchange(time.monotonic())
            exchanges.append(exchange)
            try:
                sock = _connect(port, timeout_s)
            except OSError as exc:
                exchange.error = f"connect: {exc}"
                continue
            sockets.append(sock)
            try:
                sock.sendall(_request_bytes("POST", path, port, body))
            except OSError as exc:
                exchange.error = f"send: {exc}"
                continue
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, exchange)
        deadline = time.monotonic() + timeout_s
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                reader = key.fileobj
                exchange = key.data
                assert isinstance(reader, socket.socket) and isinstance(exchange, _Exchange)
                try:
                    data = reader.recv(RECV_BYTES)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    exchange.error = f"{type(exc).__name__}: {exc}"
                    exchange.ended = time.monotonic()
                    selector.unregister(reader)
                    continue
                now = time.monotonic()
                if not data:
                    exchange.eof(now)
                else:
                    try:
                        exchange.feed(data, now)
                    except HttpError as exc:
                        exchange.error = str(exc)
                if exchange.complete or exchange.error is not None or not data:
                    selector.unregister(reader)
        for key in list(selector.get_map().values()):
            exchange = key.data
            exchange.error = exchange.error or f"no end of stream within {timeout_s:g}s"
            exchange.ended = time.monotonic()
    finally:
        selector.close()
        for sock in sockets:
            sock.close()
    return [exchange.stream_reply() for exchange in exchanges]
