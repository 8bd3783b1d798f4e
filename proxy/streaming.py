"""Relaying streams: bytes leave as they arrive, the lease is released however the stream ends.

Knows nothing of OpenAI or Ollama field names; the caller says how to frame an in-band error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Protocol

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
        close()
        lease.release()


def replacing(chunks: Iterator[bytes], replacements: list[tuple[bytes, bytes]]) -> Iterator[bytes]:
    """Yield chunks with byte strings replaced (e.g. a backend's model id by the public name)."""
    for chunk in chunks:
        for old, new in replacements:
            chunk = chunk.replace(old, new)
        yield chunk
