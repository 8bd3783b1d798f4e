"""The dashboard's live view: server-sent events carrying /status's JSON on every change and at least
every second, from a bounded number of streams at once, each ending after a few minutes (the
browser's EventSource reconnects by itself) or as soon as its client has gone.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

from proxy.admission import Once
from proxy.observe import Recent

MAX_STREAMS = 8        # each open stream holds one of waitress's threads
STREAM_S = 300.0       # a stream ends after this; EventSource reconnects (after RETRY_MS)
TICK_S = 1.0           # the longest wait between events, so countdowns move and a closed tab is noticed
MIN_GAP_S = 0.2        # a burst of changes is sent as one event, at most this often
RETRY_MS = 2000


class StreamSlots:
    """How many event streams are open; beyond the limit a new one is refused at once. Thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._open = 0  # guarded by _lock

    def take(self) -> Once | None:
        """Return a slot to release when the stream ends, or None when every slot is taken."""
        with self._lock:
            if self._open >= self.limit:
                return None
            self._open += 1
        return Once(self._release)

    def open(self) -> int:
        with self._lock:
            return self._open

    def _release(self) -> None:
        with self._lock:
            self._open -= 1


def stream_limit(threads: int) -> int:
    """Return how many streams may be open: MAX_STREAMS, but never more than an eighth of the threads."""
    return max(1, min(MAX_STREAMS, threads // 8))


def status_events(status: Callable[[], str], recent: Recent, wanted: Callable[[], bool], *,
                  lifetime_s: float = STREAM_S, tick_s: float = TICK_S,
                  clock: Callable[[], float] = time.monotonic) -> Iterator[bytes]:
    """Yield SSE events: `status` (the JSON `status()` returns) after every change of `recent` and at
    least every tick_s, and `recent` (its version) when requests or model events were recorded.

    Ends after lifetime_s, or once `wanted()` says no (the client left, its session ended).
    """
    yield f"retry: {RETRY_MS}\n\n".encode()
    ends_at = clock() + lifetime_s
    version = recent.wait(-1, 0)  # the version now, without waiting
    changed = False
    while True:
        yield b"event: status\ndata: " + status().encode() + b"\n\n"
        if changed:  # after the status it changed: the page's request list then matches its models
            yield b"event: recent\ndata: " + json.dumps({"version": version}).encode() + b"\n\n"
        sent_at = clock()
        seen = recent.wait(version, max(0.0, min(tick_s, ends_at - sent_at)))
        if clock() >= ends_at or not wanted():
            return
        changed, version = seen != version, seen
        pause = MIN_GAP_S - (clock() - sent_at)
        if changed and pause > 0:
            time.sleep(pause)  # coalesce a burst: many requests finishing at once make one event


class Held:
    """A response body that releases its stream slot when closed, even if it was never iterated
    (waitress closes the body of a client that left before its first byte)."""

    def __init__(self, chunks: Iterator[bytes], slot: Once) -> None:
        self._chunks = chunks
        self._slot = slot

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._chunks
        finally:
            self._slot.release()  # ended by itself; close() may still come, and releases nothing twice

    def close(self) -> None:
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            self._slot.release()
