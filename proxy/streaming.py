"""Relaying streams: bytes leave as they arrive, the lease is released however the stream ends;
the incremental transforms between a backend's bytes and a client's (SSE parsing, byte replacing,
HTTP de-chunking, NDJSON framing).

Knows nothing of OpenAI or Ollama field names; the caller says how to frame an in-band error.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from proxy.errors import ProxyError

log = logging.getLogger(__name__)


class Releasable(Protocol):
    """Anything with an idempotent release() (a Lease)."""

    def release(self) -> None: ...


class Guarded:
    """A response body whose cleanup runs exactly once: when it ends, breaks, or is closed, even if
    it was never iterated (a generator's own `finally` does not run when it never started)."""

    def __init__(self, body: Iterator[bytes], cleanup: Callable[[], None]) -> None:
        self._body = body
        self._cleanup = cleanup
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body
        finally:
            self.close()

    def close(self) -> None:
        """Called by waitress when the client disconnects or the response ends."""
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._cleanup()


def relay(chunks: Iterator[bytes], close: Callable[[], None], lease: Releasable,
          error_event: Callable[[ProxyError], bytes]) -> Guarded:
    """Pass chunks on as they arrive; end with an in-band error event if the backend breaks off.

    However the stream ends (done, broken, client gone), the upstream request is closed at once,
    so the backend stops generating, and the lease is released.
    """

    def body() -> Iterator[bytes]:
        try:
            yield from chunks
        except ProxyError as exc:
            log.warning("stream ended early: %s", exc.message)
            yield error_event(exc)

    return Guarded(body(), lambda: close_then_release(close, lease))


def close_then_release(close: Callable[[], None], lease: Releasable) -> None:
    try:
        close()
    finally:
        lease.release()


class StreamTransform(Protocol):
    """One incremental step between a backend's bytes and a client's (as httpx's decoders are):
    feed() takes whatever arrived and returns what can leave now; flush() returns the rest at the end."""

    def feed(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


def transformed(chunks: Iterable[bytes], transform: StreamTransform) -> Iterator[bytes]:
    """Yield what the transform lets out for each chunk (nothing when it holds it back), then its rest."""
    for chunk in chunks:
        out = transform.feed(chunk)
        if out:
            yield out
    rest = transform.flush()
    if rest:
        yield rest


REPLACE_HOLD_MAX = 1024 * 1024  # a line longer than this passes unreplaced rather than held whole


class Replacer:
    """Replaces byte strings (e.g. a backend's model id by the public name) in a stream.

    Patterns never span lines, so each piece is cut after its last newline and the rest waits for
    the next one: a pattern split between two reads is still found. The pieces of a line are kept
    in a list (linear, however many pieces) and at most REPLACE_HOLD_MAX bytes of one are held.
    """

    def __init__(self, replacements: list[tuple[bytes, bytes]]) -> None:
        self._replacements = replacements
        self._held: list[bytes] = []
        self._held_size = 0

    def feed(self, data: bytes) -> bytes:
        cut = data.rfind(b"\n") + 1
        if not cut and self._held_size + len(data) <= REPLACE_HOLD_MAX:
            self._held.append(data)
            self._held_size += len(data)
            return b""
        if not cut:
            cut = len(data)  # an endless line: let it go as it is
        whole = b"".join([*self._held, data[:cut]]) if self._held else data[:cut]
        self._held, self._held_size = ([data[cut:]], len(data) - cut) if cut < len(data) else ([], 0)
        return self._replaced(whole)

    def flush(self) -> bytes:
        rest, self._held, self._held_size = b"".join(self._held), [], 0
        return self._replaced(rest) if rest else b""

    def _replaced(self, data: bytes) -> bytes:
        for old, new in self._replacements:
            data = data.replace(old, new)
        return data


def replacing(chunks: Iterator[bytes], replacements: list[tuple[bytes, bytes]]) -> Iterator[bytes]:
    """Yield chunks with byte strings replaced (see Replacer)."""
    return transformed(chunks, Replacer(replacements))


_EVENT_END = re.compile(rb"(?:\r\n|\n)(?:\r\n|\n)")  # a blank line, LF or CRLF framing


class SSEParser:
    """Server-sent events, incrementally: feed() returns the data of each event the bytes complete
    (LF or CRLF framing; comments and other fields skipped); flush() a last, unterminated one.

    Each piece is searched only where a new event end can be (its own bytes and the 3 before), so
    a long event arriving in many pieces costs linear time, not quadratic.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[str]:
        buffer = self._buffer
        search_from = max(0, len(buffer) - 3)  # an event end may straddle two pieces
        buffer += data
        start, events = 0, []
        while (end := _EVENT_END.search(buffer, search_from)) is not None:
            event = _event_data(bytes(buffer[start:end.start()]).replace(b"\r\n", b"\n"))
            start = search_from = end.end()
            if event is not None:
                events.append(event)
        if start:
            del buffer[:start]
        return events

    def flush(self) -> list[str]:
        event = _event_data(bytes(self._buffer).replace(b"\r\n", b"\n").strip(b"\n"))
        self._buffer = bytearray()
        return [event] if event is not None else []


def sse_data(chunks: Iterable[bytes]) -> Iterator[str]:
    """Yield the data of each server-sent event as it completes (see SSEParser)."""
    parser = SSEParser()
    for chunk in chunks:
        yield from parser.feed(chunk)
    yield from parser.flush()


def _event_data(event: bytes) -> str | None:
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines).decode("utf-8", "replace") if lines else None


def ndjson(record: Any) -> bytes:
    """Return one NDJSON line: compact JSON and exactly one newline."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class ChunkedDecoder:
    """Incremental decoder of HTTP/1.1 chunked transfer encoding (RFC 9112 section 7.1).

    feed() takes whatever bytes arrived and returns all the payload they complete, so a burst of
    small chunks comes out as one piece while a lone chunk comes out at once. Raises ValueError on
    malformed framing.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._left = 0          # payload bytes still due in the current chunk
        self._state = "size"    # size -> data -> crlf -> size ... -> trailer -> done
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        out = []
        while buffer and not self.done:
            if self._state == "data":
                piece = buffer[: self._left]
                out.append(piece)
                self._left -= len(piece)
                buffer = buffer[len(piece):]
                if self._left == 0:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(buffer) < 2:
                    break
                if buffer[:2] != b"\r\n":
                    raise ValueError("chunked encoding: no CRLF after a chunk's data")
                buffer = buffer[2:]
                self._state = "size"
            else:  # "size" or "trailer": a line
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 4096:
                        raise ValueError("chunked encoding: a chunk-size or trailer line is too long")
                    break
                line, buffer = buffer[:end], buffer[end + 2:]
                if self._state == "trailer":
                    self.done = line == b""  # trailer fields are skipped; an empty line ends the body
                    continue
                size = int(line.split(b";", 1)[0].strip(), 16)  # ValueError when it is not hex
                if size < 0:
                    raise ValueError("chunked encoding: negative chunk size")
                self._left, self._state = size, "data" if size else "trailer"
        self._buffer = buffer
        return b"".join(out)

    @property
    def leftover(self) -> bytes:
        """Bytes fed after the body's end (none from a well-behaved server: the connection is then reusable)."""
        return self._buffer if self.done else b""

    def flush(self) -> bytes:
        """End the body: everything was returned by feed(); raises ValueError if it was cut short."""
        if not self.done:
            raise ValueError("chunked encoding: the body ended before its last chunk")
        return b""
