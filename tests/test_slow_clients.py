"""Clients that stop reading: a stream whose client accepts nothing for proxy.client_timeout is cut,
its lease released, so swaps and unloads proceed; a slow but steady reader is never cut.
Through the real proxy.py, with raw sockets for clients that misbehave.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

from tests.conftest import FIGURES, ProxyProcess, fake_profile

Start = Callable[..., ProxyProcess]


def raw_stream_request(proxy: ProxyProcess, receive_buffer: int | None = None) -> socket.socket:
    """Send a streaming chat request on a raw socket and return the socket, unread."""
    sock = socket.socket()
    if receive_buffer is not None:  # before connect, so the window the proxy sees stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", proxy.port))
    body = json.dumps({"model": "fake", "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                 b"Authorization: " + proxy.headers()["Authorization"].encode() + b"\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def test_a_client_that_reads_nothing_is_cut_after_client_timeout_and_its_model_can_unload(start_proxy: Start) -> None:
    # About 40 MB of events: more than the socket buffers and even waitress's default 16 MB output
    # buffer hold, so the relay blocks on the client (a smaller answer would just sit in the buffers).
    proxy = start_proxy({"fake": fake_profile("--tokens", "250000")},
                        proxy={"client_timeout": 2, "queue_timeout": 15})
    assert proxy.chat("fake").status_code == 200  # loaded
    stalled = raw_stream_request(proxy, receive_buffer=4096)
    try:
        proxy.wait_for(lambda: proxy.status("fake")["leases"] == 1, what="the stream to start")
        started = time.monotonic()
        proxy.wait_for(lambda: proxy.status("fake")["leases"] == 0, timeout_s=30,
                       what="the stalled stream to be cut and its lease released")
        waited = time.monotonic() - started
        assert "proxy.client_timeout" in proxy.log()  # the log says why
        FIGURES["slow_reader_cut_after_s (client_timeout 2)"] = round(waited, 1)
        assert waited >= 1.0  # not before the client had client_timeout to read
        unload_started = time.monotonic()
        unloaded = proxy.get("/unload?model=fake", admin=True, timeout=30)  # waits for leases; none is left
        assert unloaded.status_code == 200 and unloaded.json() == {"unloaded": ["fake"]}
        assert time.monotonic() - unload_started < 10
        assert proxy.chat("fake").status_code == 200  # and the model serves again
    finally:
        stalled.close()


def test_a_slow_but_steady_reader_is_never_cut(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile("--tokens", "3000")}, proxy={"client_timeout": 1})
    assert proxy.chat("fake").status_code == 200
    reader = raw_stream_request(proxy, receive_buffer=4096)
    received = bytearray()
    started = time.monotonic()
    try:
        reader.settimeout(20)
        while b"[DONE]" not in received[-64:] and time.monotonic() - started < 60:
            piece = reader.recv(4096)
            if not piece:
                break
            received += piece
            time.sleep(0.01)  # about 400 KB/s at most: the answer takes longer than client_timeout
    finally:
        reader.close()
    assert b"[DONE]" in received, f"stream ended early after {len(received)} bytes"
    assert time.monotonic() - started > 1.0  # it did outlast client_timeout
    assert "proxy.client_timeout" not in proxy.log()
