"""Admission: how many requests may be in progress at once, all keys together and per key.

Every request in progress holds one of waitress's threads, a waiting one included. The global
limit stays below `threads`, so a reserve of threads always serves /health, /ping, admin routes
and rejections; beyond either limit a request is refused at once (503 or 429, with Retry-After)
instead of waiting, unanswered, in the server's queue. Keys are known here by their name only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from proxy.auth import KeyEntry
from proxy.errors import RateLimited, ServerBusy

RETRY_AFTER_S = 2
BODIES_IN_BUDGET = 2  # request bodies in progress may take this many times proxy.max_body_mb together
# Routes that are never counted: the reserve serves them (/health and /ping are there too).
RESERVED_BLUEPRINTS = frozenset({"admin", "metrics"})


class Once:
    """A release that runs once: the first release() calls it, later ones do nothing (the access log
    and error paths may both release a request's slot or its body's share)."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback: Callable[[], None] | None = callback

    def release(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


class Admission:
    """Counters of requests in progress; thread-safe, and nothing here ever waits."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._lock = threading.Lock()
        self._in_progress = 0                 # guarded by _lock
        self._per_key: dict[str, int] = {}    # guarded by _lock: key name -> requests in progress

    def admit(self, entry: KeyEntry | None, default_key_limit: int) -> Once:
        """Count one more request in progress and return its slot.

        Raises RateLimited (429) when the key already has its limit in progress (its own
        max_concurrent, else default_key_limit; 0: none) and ServerBusy (503) when every slot is
        taken. entry is None when auth is off: only the global limit applies.
        """
        key = entry.name if entry is not None else None
        limit = 0
        if entry is not None:
            limit = default_key_limit if entry.max_concurrent is None else entry.max_concurrent
        with self._lock:
            held = self._per_key.get(key, 0) if key is not None else 0
            if limit and held >= limit:
                source = ("proxy.key_max_concurrent" if entry is None or entry.max_concurrent is None
                          else "its max_concurrent in api_tokens.yml")
                raise RateLimited(f"key {key!r} already has {held} request(s) in progress, its limit ({source}); "
                                  f"retry when one ends", retry_after_s=RETRY_AFTER_S)
            if self._in_progress >= self.slots:
                raise ServerBusy(f"the proxy already has {self._in_progress} requests in progress, its limit "
                                 f"(proxy.threads - proxy.reserved_threads); retry in {RETRY_AFTER_S}s",
                                 retry_after_s=RETRY_AFTER_S)
            self._in_progress += 1
            if key is not None:
                self._per_key[key] = held + 1
        return Once(lambda: self.release(key))

    def in_progress(self) -> int:
        """Return the requests in progress now (a snapshot)."""
        with self._lock:
            return self._in_progress

    def release(self, key: str | None) -> None:
        """Count one request of `key` as finished (its Once calls it)."""
        with self._lock:
            self._in_progress -= 1
            if key is not None:
                left = self._per_key.get(key, 1) - 1
                if left > 0:
                    self._per_key[key] = left
                else:
                    self._per_key.pop(key, None)


class BodyBudget:
    """The memory all request bodies in progress may take together, counted by their Content-Length.

    One body may be up to max_body_mb; a budget of BODIES_IN_BUDGET of them keeps a few clients
    that each send the largest bodies from taking the proxy's memory together (four 60 MB bodies
    once took 1 GB). Beyond it a request is refused at once, before its body is read.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._held = 0  # guarded by _lock

    def hold(self, size: int) -> Once:
        """Count a body of `size` bytes as in progress until the returned hold is released."""
        with self._lock:
            if self._held and self._held + size > self.limit_bytes:
                raise ServerBusy(f"request bodies in progress already take {self._held / 1048576:.0f} MiB, the most "
                                 f"the proxy holds at once ({BODIES_IN_BUDGET} x proxy.max_body_mb); retry in "
                                 f"{RETRY_AFTER_S}s", retry_after_s=RETRY_AFTER_S)
            self._held += size
        return Once(lambda: self.release(size))

    def held(self) -> int:
        """Return the bytes held now (a snapshot)."""
        with self._lock:
            return self._held

    def release(self, size: int) -> None:
        """Count a body of `size` bytes as finished (its Once calls it)."""
        with self._lock:
            self._held -= size
