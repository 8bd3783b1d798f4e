"""Relaying streams: bytes leave as they arrive, the lease is released however the stream ends.

Knows nothing of OpenAI or Ollama field names; the caller says how to frame an in-band error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from proxy.errors import ProxyError

log = logging.getLogger(__name__)


class Releasable(Protocol):
    """Anything with an idempotent release() (a Lease)."""

    def release(self) -> None: ...


def relay(chunks: Iterator[bytes], close: Callable[[], None], lease: Releasable,
          error_event: Callable[[ProxyError], bytes]) -> Iterator[bytes]:
    """Yield chunks as they arrive; end with an in-band error event if the backend breaks off.

    waitress calls close() on this generator when the client disconnects, which closes the
    upstream request at once (so the backend stops generating) and releases the lease.
    """
    try:
        yield from chunks
    except ProxyError as exc:
        log.warning("stream ended early: %s", exc.message)
        yield error_event(exc)
    finally:
        try:
            close()
        finally:
            lease.release()


def replacing(chunks: Iterator[bytes], replacements: list[tuple[bytes, bytes]]) -> Iterator[bytes]:
    """Yield chunks with byte strings replaced (e.g. a backend's model id by the public name).

    Patterns never span lines, so each chunk is cut after its last newline and the rest waits for
    the next one: a pattern split between two reads is still found.
    """
    carry = b""
    for chunk in chunks:
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        data, carry = data[:cut], data[cut:]
        if data:
            yield _replaced(data, replacements)
    if carry:
        yield _replaced(carry, replacements)


def _replaced(data: bytes, replacements: list[tuple[bytes, bytes]]) -> bytes:
    for old, new in replacements:
        data = data.replace(old, new)
    return data


def sse_data(chunks: Iterable[bytes]) -> Iterator[str]:
    """Yield the data of each server-sent event as it completes (LF or CRLF framing; comments skipped)."""
    buffer = b""
    for chunk in chunks:
        buffer = (buffer + chunk).replace(b"\r\n", b"\n")
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[:end], buffer[end + 2:]
            data = _event_data(event)
            if data is not None:
                yield data
    data = _event_data(buffer.strip(b"\n"))  # a last event the backend did not terminate
    if data is not None:
        yield data


def _event_data(event: bytes) -> str | None:
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines).decode("utf-8", "replace") if lines else None


def ndjson(record: Any) -> bytes:
    """Return one NDJSON line: compact JSON and exactly one newline."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
