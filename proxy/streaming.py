"""Relaying streams: bytes leave as they arrive, the lease is released however the stream ends.

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


REPLACE_HOLD_MAX = 1024 * 1024  # a line longer than this passes unreplaced rather than held whole


def replacing(chunks: Iterator[bytes], replacements: list[tuple[bytes, bytes]]) -> Iterator[bytes]:
    """Yield chunks with byte strings replaced (e.g. a backend's model id by the public name).

    Patterns never span lines, so each chunk is cut after its last newline and the rest waits for
    the next one: a pattern split between two reads is still found. The pieces of a line are kept
    in a list (linear, however many pieces) and at most REPLACE_HOLD_MAX bytes of one are held.
    """
    held: list[bytes] = []
    held_size = 0
    for chunk in chunks:
        cut = chunk.rfind(b"\n") + 1
        if not cut and held_size + len(chunk) <= REPLACE_HOLD_MAX:
            held.append(chunk)
            held_size += len(chunk)
            continue
        if not cut:
            cut = len(chunk)  # an endless line: let it go as it is
        data = b"".join([*held, chunk[:cut]]) if held else chunk[:cut]
        held, held_size = ([chunk[cut:]], len(chunk) - cut) if cut < len(chunk) else ([], 0)
        yield _replaced(data, replacements)
    if held:
        yield _replaced(b"".join(held), replacements)


def _replaced(data: bytes, replacements: list[tuple[bytes, bytes]]) -> bytes:
    for old, new in replacements:
        data = data.replace(old, new)
    return data


_EVENT_END = re.compile(rb"(?:\r\n|\n)(?:\r\n|\n)")  # a blank line, LF or CRLF framing


def sse_data(chunks: Iterable[bytes]) -> Iterator[str]:
    """Yield the data of each server-sent event as it completes (LF or CRLF framing; comments skipped).

    Each chunk is searched only where a new event end can be (its own bytes and the 3 before), so
    a long event arriving in many pieces costs linear time, not quadratic.
    """
    buffer = bytearray()
    for chunk in chunks:
        search_from = max(0, len(buffer) - 3)  # an event end may straddle two chunks
        buffer += chunk
        start = 0
        while (end := _EVENT_END.search(buffer, search_from)) is not None:
            data = _event_data(bytes(buffer[start:end.start()]).replace(b"\r\n", b"\n"))
            start = search_from = end.end()
            if data is not None:
                yield data
        if start:
            del buffer[:start]
    data = _event_data(bytes(buffer).replace(b"\r\n", b"\n").strip(b"\n"))  # a last event the backend did not end
    if data is not None:
        yield data


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
