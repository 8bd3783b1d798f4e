"""Noticing a client that leaves while the proxy waits for its backend, and cutting that backend request.

waitress tells a view whether its client is still connected, but only when asked; a view blocked on
a backend (a long non-stream answer, a long prefill) never asks. A watch asks for it every
WATCH_POLL_S from one background thread and, once the client is gone, shuts the socket of the
request's backend connection: the blocked read returns at once, the lease is released, and the
backend (llama.cpp, TabbyAPI) sees the disconnect and stops generating.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import urllib3

log = logging.getLogger(__name__)

WATCH_POLL_S = 0.2
Cancelled = Callable[[], bool]


class Watch:
    """One request's watch: its client check and the backend connection it sends on."""

    def __init__(self, cancelled: Cancelled) -> None:
        self.cancelled = cancelled
        self.connection: urllib3.connection.HTTPConnection | None = None
        self.fired = False  # the client left and the connection was (or will be) cut

    def cut(self) -> bool:
        """Shut the backend connection down; return False while there is none yet."""
        self.fired = True
        sock = self.connection.sock if self.connection is not None else None
        if sock is None:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: nothing is blocked on it
        return True


class _Current(threading.local):
    watch: Watch | None = None


_current = _Current()


def gone() -> bool:
    """Say whether the calling thread's request lost its client (its backend connection was cut)."""
    return _current.watch is not None and _current.watch.fired


def _join_watch(connection: urllib3.connection.HTTPConnection) -> None:
    """Make a backend connection that is about to send a request the calling thread's watched one."""
    watch = _current.watch
    if watch is not None:
        watch.connection = connection
        if watch.fired:  # the client left before this request went out
            raise ConnectionAbortedError("the client closed the connection")


class WatchedConnection(urllib3.connection.HTTPConnection):
    """A backend connection that joins the calling thread's watch when it sends a request."""

    def request(self, *args: Any, **kwargs: Any) -> None:  # urllib3's arguments pass through unchanged
        _join_watch(self)
        super().request(*args, **kwargs)


class WatchedHTTPSConnection(urllib3.connection.HTTPSConnection):
    """The same for a remote backend over TLS."""

    def request(self, *args: Any, **kwargs: Any) -> None:
        _join_watch(self)
        super().request(*args, **kwargs)


class WatchedPool(urllib3.HTTPConnectionPool):
    ConnectionCls = WatchedConnection


class WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection


class Watcher:
    """The one thread that checks every watched request's client, every poll_s.

    It ticks on its own (five times a second, a negligible cost) rather than being woken, so that
    watching a request costs it only a set insertion: no thread switch on the request's path.
    """

    def __init__(self, poll_s: float = WATCH_POLL_S) -> None:
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()  # guarded by _lock
        self._thread: threading.Thread | None = None  # guarded by _lock; started with the first watch

    @contextmanager
    def watching(self, cancelled: Cancelled | None) -> Iterator[None]:
        """Watch the calling thread's backend requests inside the block (no-op without `cancelled`)."""
        if cancelled is None:
            yield
            return
        watch = Watch(cancelled)
        previous, _current.watch = _current.watch, watch
        with self._lock:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="client-watch", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            _current.watch = previous
            with self._lock:
                self._watches.discard(watch)

    def _run(self) -> None:
        while True:
            time.sleep(self._poll_s)
            with self._lock:
                watches = list(self._watches)
            for watch in watches:
                try:
                    if watch.cancelled() and watch.cut():
                        with self._lock:
                            self._watches.discard(watch)
                except Exception:  # one bad check must not stop the others being watched
                    log.exception("checking a client's connection failed")
