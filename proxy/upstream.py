"""The HTTP client to backends: one urllib3 PoolManager (pooled keep-alive connections to every
backend), timeouts, and the one place where urllib3's exceptions become ProxyErrors. Holds no leases
and decides no swaps.

urllib3 directly, not requests on top of it: for one small request requests spent about a third of
the client's CPU preparing, merging and parsing again what the proxy already knows (its settings,
the URL, the headers), and checking its runtime type protocols (README, Performance).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any, NamedTuple

import requests.utils
import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError

from proxy.disconnects import Cancelled, Watcher, WatchedHTTPSPool, WatchedPool, gone
from proxy.errors import BackendFailed, BackendTimeout, ClientGone
from proxy.manager import Lease
from proxy.streaming import ChunkedDecoder


log = logging.getLogger(__name__)

READ_SIZE = 16 * 1024  # a burst larger than this leaves in several writes
POOLS = 32  # backends with pooled connections at once (the least recently used pool beyond it is closed)

Response = urllib3.BaseHTTPResponse


class Target(NamedTuple):
    """A backend's base URL taken apart once: where to connect, and the path prefix its routes sit under."""

    scheme: str
    host: str
    port: int | None
    prefix: str


@functools.lru_cache(maxsize=256)
def target(base_url: str) -> Target:
    """Parse a lease's base URL (http://127.0.0.1:PORT, or a remote's https://host/prefix) once per URL."""
    url = urllib3.util.parse_url(base_url)
    return Target(url.scheme or "http", url.host or "", url.port, (url.path or "").rstrip("/"))


class Upstream:
    """Requests to backends over one connection pool; every failure comes out as a ProxyError."""

    def __init__(self, *, connect_timeout_s: float, read_timeout_s: float, pool_size: int,
                 max_answer_bytes: int = 256 * 1024 * 1024, ca_certs: str | None = None) -> None:
        self._connect_timeout_s, self._read_timeout_s = connect_timeout_s, read_timeout_s
        self.max_answer_bytes = max_answer_bytes  # the most of one answer read() holds (proxy.max_answer_mb)
        # Never through an HTTP(S)_PROXY (urllib3 reads no environment), never a retry or a redirect of
        # its own (the one send once more after a reset is ours), a pool per backend that grows to
        # pool_size connections without ever blocking a request. A remote over HTTPS is verified
        # against the CA bundle the proxy's other clients use (requests': the remote probe, peers).
        self._pools = urllib3.PoolManager(
            num_pools=POOLS, maxsize=pool_size, block=False, retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            ca_certs=ca_certs or requests.utils.DEFAULT_CA_BUNDLE_PATH)
        self._pools.pool_classes_by_scheme = {"http": WatchedPool, "https": WatchedHTTPSPool}
        self._watcher = Watcher()

    def watching(self, cancelled: Cancelled | None) -> contextlib.AbstractContextManager[None]:
        """Inside the block, a client that leaves cuts the calling thread's backend request (ClientGone)."""
        return self._watcher.watching(cancelled)

    def post(self, lease: Lease, path: str, body: Mapping[str, Any],
             headers: Mapping[str, str] | None = None) -> Response:
        """Send a JSON body to the leased backend; return the response with its body unread."""
        data = json.dumps(body, separators=(",", ":")).encode()
        return self._send(lease, path, data, "application/json", headers or {})

    def post_raw(self, lease: Lease, path: str, body: RawBody) -> Response:
        """Send a body as the client sent it (its bytes and Content-Type: multipart included), read
        from a file as it goes, never held whole; return the response with its body unread."""
        return self._send(lease, path, body, body.content_type, {"Content-Length": str(len(body))}, body.rewind)

    def _send(self, lease: Lease, path: str, data: Any, content_type: str, headers: Mapping[str, str],
              rewind: Callable[[], bool] = lambda: True) -> Response:
        where = target(lease.base_url)
        pool = self._pools.connection_from_host(where.host, where.port, where.scheme)
        headers = {"Content-Type": content_type, **lease.headers, **headers}
        try:
            return self._post_once_more_after_a_reset(lease, pool, where.prefix + path, data, headers, rewind)
        except ReadTimeoutError as exc:
            raise BackendTimeout(f"{lease.model_name}: no response within {self._read_timeout_s:g}s "
                                 "(proxy.read_timeout)") from exc
        except ConnectTimeoutError as exc:
            if gone():
                raise _client_gone(lease) from exc
            if isinstance(exc, NewConnectionError):  # a refusal (urllib3 derives it from the timeout)
                raise BackendFailed(f"{lease.model_name}: cannot reach the backend at {lease.base_url}: "
                                    f"{_reason(exc)}") from exc
            raise BackendTimeout(f"{lease.model_name}: cannot reach the backend at {lease.base_url}: no "
                                 f"connection within {self._connect_timeout_s:g}s (proxy.connect_timeout)") from exc
        except (HTTPError, OSError) as exc:
            if gone():
                raise _client_gone(lease) from exc
            raise BackendFailed(f"{lease.model_name}: cannot reach the backend at {lease.base_url}: "
                                f"{_reason(exc)}") from exc

    def _post_once_more_after_a_reset(self, lease: Lease, pool: urllib3.HTTPConnectionPool, url: str, data: Any,
                                      headers: Mapping[str, str], rewind: Callable[[], bool]) -> Response:
        """POST, and once more if the connection was reset before a byte of the answer arrived.

        A pooled keep-alive connection that the backend closed while idle fails exactly so; the
        backend never answered, so sending again cannot answer twice. Any other failure, and a
        second reset, propagate.
        """
        try:
            return self._post(pool, url, data, headers)
        except (HTTPError, OSError) as exc:
            if not _reset_before_answer(exc) or gone() or not rewind():
                raise
            log.info("model %s: the connection to the backend was reset before any answer (%s); sending once more",
                     lease.model_name, _reason(exc))
        return self._post(pool, url, data, headers)

    @staticmethod
    def _post(pool: urllib3.HTTPConnectionPool, url: str, data: Any, headers: Mapping[str, str]) -> Response:
        # The body stays unread (preload_content=False) and the connection with it until it is read
        # to its end (then urllib3 pools it again) or closed.
        return pool.urlopen("POST", url, body=data, headers=headers, redirect=False, assert_same_host=False,
                            preload_content=False, decode_content=False)

    def read(self, lease: Lease, response: Response) -> bytes:
        """Return a whole response body; the connection goes back to the pool.

        Holds at most max_answer_bytes: a larger answer is a BackendFailed (502) naming the limit,
        so that one huge answer cannot take the proxy's memory.
        """
        limit = self.max_answer_bytes
        try:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise self._too_large(lease)
            parts, size = [], 0
            for part in response.stream(READ_SIZE * 4, decode_content=True):
                size += len(part)
                if size > limit:
                    raise self._too_large(lease)
                parts.append(part)
            return b"".join(parts)
        except (HTTPError, OSError, ValueError) as exc:
            raise self._broken(lease, exc) from exc
        finally:
            close_response(response)

    def _too_large(self, lease: Lease) -> BackendFailed:
        return BackendFailed(f"{lease.model_name}: the backend's answer is larger than "
                             f"{self.max_answer_bytes / 1048576:g} MiB, the most the proxy holds to translate "
                             "one answer (proxy.max_answer_mb)")

    def iter_body(self, lease: Lease, response: Response) -> Iterator[bytes]:
        """Yield the body as the backend sends it: whatever has arrived, at once; raise ProxyError if it breaks.

        For a chunked body (every streaming backend's) the socket is read directly and de-chunked
        here: each read takes what has arrived, so a lone token leaves at once and a fast backend's
        burst leaves in one write instead of one per event (urllib3 yields one HTTP chunk per call).
        The read timeout bounds the gap between two reads, so a silent backend cannot pin a lease.
        """
        reader = chunked_socket_reader(response)
        try:
            if reader is None:  # a sized or close-delimited body: whatever has arrived, at most READ_SIZE
                while data := response.read1(READ_SIZE, decode_content=False):
                    yield data
                return
            decoder = ChunkedDecoder()
            with kernel_read_timeout(response, self._read_timeout_s):
                while not decoder.done:
                    asked = time.monotonic()
                    data = reader.read1(READ_SIZE)
                    if not data:
                        if time.monotonic() - asked >= self._read_timeout_s * 0.99:  # the kernel's timeout
                            raise TimeoutError("the backend sent nothing for the read timeout")
                        raise ConnectionResetError("the backend closed the connection in the middle of the body")
                    payload = decoder.feed(data)
                    if payload:
                        yield payload
            if not decoder.leftover:
                give_back_connection(response)  # the next stream to this backend needs no new connection
        except (HTTPError, OSError, ValueError) as exc:
            raise self._broken(lease, exc) from exc

    def _broken(self, lease: Lease, exc: Exception) -> BackendFailed | BackendTimeout | ClientGone:
        if gone():
            return _client_gone(lease)
        if isinstance(exc, TimeoutError | urllib3.exceptions.TimeoutError) or "timed out" in str(exc).lower():
            return BackendTimeout(f"{lease.model_name}: the backend sent nothing for {self._read_timeout_s:g}s "
                                  "(proxy.read_timeout)")
        return BackendFailed(f"{lease.model_name}: the backend broke off its answer ({_reason(exc)}); "
                             "it may have crashed; see /status")

    def close(self) -> None:
        self._pools.clear()


def close_response(response: Response) -> None:
    """End a response: a body read to its end has given its connection back to the pool already
    (urllib3 does that at the end); one left unread closes its connection, which is never reused."""
    response.close()
    response.release_conn()


class RawBody:
    """A request body forwarded as the client sent it: a file read in pieces, its size and Content-Type.

    urllib3 sends an object with read() a block at a time; its size goes ahead in Content-Length.
    """

    def __init__(self, source: IO[bytes], size: int, content_type: str) -> None:
        self._source = source
        self._size = size
        self.content_type = content_type

    def __len__(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes:
        return self._source.read(size)

    def rewind(self) -> bool:
        """Go back to the first byte, for a send once more after a reset; say whether it could."""
        if not self._source.seekable():
            return False
        self._source.seek(0)
        return True


def chunked_socket_reader(response: Response) -> Any:
    """Return the buffered socket reader under a chunked response, or None to read it the usual way.

    Neither urllib3 nor http.client offers a supported way to take whatever bytes of a chunked body
    have arrived (their read1() stops at every chunk, one write per token), so this reaches into
    urllib3's `_fp` (the http.client response) and its `fp`. It is the only place that does, and
    tests/test_upstream.py fails if either library changes them, instead of falling back silently.
    Reading the socket bypasses http.client's own chunk state: once the whole body has been read,
    give_back_connection() hands the connection back to the pool; otherwise close() closes it
    (urllib3 closes a connection whose response it did not finish).
    """
    http_response = getattr(response, "_fp", None)  # urllib3 2.x: the http.client response
    reader = getattr(http_response, "fp", None)
    if not getattr(http_response, "chunked", False) or not hasattr(reader, "read1"):
        return None
    if getattr(http_response, "chunk_left", None) is not None:
        return None  # http.client started reading chunks already: keep to its path
    return reader


@contextlib.contextmanager
def kernel_read_timeout(response: Response, timeout_s: float) -> Iterator[None]:
    """Inside the block, the response's socket blocks in recv() with the read timeout kept by the kernel
    (SO_RCVTIMEO) instead of Python's: a socket with a Python timeout polls before every recv, one more
    system call and one more hand-over of the GIL for every token of every stream. The kernel's
    timeout reads as an empty read (EAGAIN: no data), which the caller tells from an end of data by
    the time it waited. The socket's own timeout comes back at the end, for the connection's next request.
    """
    connection = response.connection
    sock = getattr(connection, "sock", None)
    if sock is None or timeout_s <= 0 or isinstance(sock, ssl.SSLSocket):
        yield  # TLS (a remote): its blocking read would end in SSLWantReadError; Python's timeout stays
        return
    previous = sock.gettimeout()
    seconds = int(timeout_s)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("@ll", seconds, int((timeout_s - seconds) * 1_000_000)))
    sock.settimeout(None)
    try:
        yield
    finally:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, 0))
            sock.settimeout(previous)
        except OSError:
            pass  # closed meanwhile (the client left and the watcher cut it): it is never reused


def give_back_connection(response: Response) -> None:
    """After chunked_socket_reader's socket gave the whole body (through its last chunk): mark the
    http.client response done (its public close() drops its file object; the socket stays with its
    connection, as after any body it read itself) and release the connection to urllib3's pool.

    Not when the backend said it closes the connection (http.client's will_close).
    """
    http_response = getattr(response, "_fp", None)
    if http_response is None or getattr(http_response, "will_close", True):
        return
    http_response.close()
    response.release_conn()


def _client_gone(lease: Lease) -> ClientGone:
    return ClientGone(f"{lease.model_name}: the client closed the connection; the backend request was cut")


def _reset_before_answer(exc: BaseException) -> bool:
    """Say whether a urllib3 error is a connection reset or closed before any byte of an answer.

    http.client raises RemoteDisconnected when the status line gets no byte at all, and a reset
    or a broken pipe while sending means the request never arrived; urllib3 wraps them in a
    ProtocolError. A refused connection is not one: retrying it is pointless. A reset after the
    answer began happens later, in read() or iter_body().
    """
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError):
            return True
        pending += [arg for arg in error.args if isinstance(arg, BaseException)]
        pending += [cause for cause in (error.__cause__, error.__context__, getattr(error, "reason", None))
                    if isinstance(cause, BaseException)]
    return False


def _reason(exc: Exception) -> str:
    text = str(exc.__cause__ or exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."
