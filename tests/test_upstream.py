"""The HTTP client's reliance on library internals, checked against the installed libraries: if
urllib3 or http.client change what chunked_socket_reader reads, this fails loudly (the relay would
otherwise fall back, silently, to one write per HTTP chunk).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import urllib3

from proxy.errors import BackendFailed
from proxy.streaming import ChunkedDecoder
from proxy.upstream import (Upstream, chunked_socket_reader, close_response, give_back_connection,
                            kernel_read_timeout)
from tests.conftest import FAKE_BACKEND, free_port, wait_until

EVENTS = [b"data: %d\n\n" % number for number in range(50)]


class _Chunked(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: set[int] = set()  # the client ports seen: one per connection

    def do_GET(self) -> None:
        _Chunked.connections.add(self.client_address[1])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if self.path == "/sized":
            body = b"".join(EVENTS)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        # Every event its own HTTP chunk, all sent at once: a burst the relay should pass in one write.
        self.wfile.write(b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in EVENTS) + b"0\r\n\r\n")

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that cuts a stream short resets its connection: expected here, not worth a traceback


@pytest.fixture
def server() -> Iterator[str]:
    httpd = _Server(("127.0.0.1", 0), _Chunked)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _get(pools: urllib3.PoolManager, url: str) -> urllib3.BaseHTTPResponse:
    return pools.request("GET", url, preload_content=False, timeout=5, retries=False)


def _read_to_the_last_chunk(reader: Any) -> tuple[bytes, ChunkedDecoder]:
    """Read a chunked body from its socket reader as the relay does; return the payload and the decoder."""
    decoder, payload = ChunkedDecoder(), b""
    while not decoder.done:
        payload += decoder.feed(reader.read1(16384))
    return payload, decoder


def test_the_socket_under_a_chunked_response_is_reachable_and_decodes(server: str) -> None:
    with _get(urllib3.PoolManager(), server + "/chunked") as response:
        reader = chunked_socket_reader(response)
        assert reader is not None, "urllib3/http.client changed: chunked_socket_reader finds no socket reader"
        payload, _ = _read_to_the_last_chunk(reader)
        assert payload == b"".join(EVENTS)


def test_a_sized_response_is_read_the_usual_way(server: str) -> None:
    with _get(urllib3.PoolManager(), server + "/sized") as response:
        assert chunked_socket_reader(response) is None
        assert response.read1(1 << 20)[:8] == b"data: 0\n"


def test_a_stream_read_to_its_end_gives_its_connection_back_to_the_pool(server: str) -> None:
    pools = urllib3.PoolManager()
    _Chunked.connections.clear()
    for _ in range(5):
        response = _get(pools, server + "/chunked")
        reader = chunked_socket_reader(response)
        assert reader is not None
        payload, decoder = _read_to_the_last_chunk(reader)
        assert payload == b"".join(EVENTS) and not decoder.leftover
        give_back_connection(response)
        close_response(response)  # what the relay does at the end: harmless once given back
    assert len(_Chunked.connections) == 1  # five streams, one connection
    pools.clear()


def test_a_stream_cut_short_does_not_give_its_connection_back(server: str) -> None:
    pools = urllib3.PoolManager()
    _Chunked.connections.clear()
    for _ in range(2):
        response = _get(pools, server + "/chunked")
        reader = chunked_socket_reader(response)
        assert reader is not None
        reader.read1(10)  # the client left after the first bytes
        close_response(response)
    assert len(_Chunked.connections) == 2  # a half-read connection is closed, never reused
    pools.clear()


def test_a_kernel_read_timeout_gives_the_socket_its_own_timeout_back(server: str) -> None:
    pools = urllib3.PoolManager()
    response = pools.request("GET", server + "/chunked", preload_content=False, timeout=7, retries=False)
    sock = response.connection.sock
    assert sock.gettimeout() == 7
    with kernel_read_timeout(response, 2.5):
        assert sock.gettimeout() is None  # blocking: the kernel keeps the timeout, no poll before each recv
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16) == struct.pack("@ll", 2, 500_000)
        _read_to_the_last_chunk(chunked_socket_reader(response))
    assert sock.gettimeout() == 7 and sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16) == bytes(16)
    give_back_connection(response)
    pools.clear()


@pytest.fixture
def tls_backend(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The fake backend over HTTPS with a self-signed certificate for 127.0.0.1: (its URL, the certificate)."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is needed to make the test certificate (Debian: openssl)")
        pytest.skip("openssl is not installed: no test certificate for the HTTPS backend")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    server = subprocess.Popen([sys.executable, str(FAKE_BACKEND), "--port", str(port), "--model", "far", "--tokens", "3",
                               "--tls", str(cert), str(key)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"https://127.0.0.1:{port}"
        pools = urllib3.PoolManager(ca_certs=str(cert), retries=False)

        def up() -> bool:
            try:
                return pools.request("GET", url + "/health", timeout=1).status == 200
            except urllib3.exceptions.HTTPError:
                return False
        wait_until(up, 30, "the HTTPS fake backend")
        yield url, str(cert)
    finally:
        server.kill()
        server.wait(10)


def test_a_remote_over_https_is_verified_then_streams_and_reuses_its_connection(
        tls_backend: tuple[str, str]) -> None:
    url, cert = tls_backend
    lease = SimpleNamespace(base_url=url, headers={}, model_name="far")
    upstream = Upstream(connect_timeout_s=5, read_timeout_s=30, pool_size=4, ca_certs=cert)
    body = {"model": "far", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    try:
        for _ in range(2):  # the second stream goes over the pooled TLS connection of the first
            response = upstream.post(lease, "/v1/chat/completions", body)  # type: ignore[arg-type]
            assert response.status == 200
            streamed = b"".join(upstream.iter_body(lease, response))  # type: ignore[arg-type]
            close_response(response)
            assert streamed.count(b"data: ") >= 4 and streamed.rstrip().endswith(b"data: [DONE]")
        answer = upstream.post(lease, "/v1/chat/completions", {**body, "stream": False})  # type: ignore[arg-type]
        assert json.loads(upstream.read(lease, answer))["object"] == "chat.completion"  # type: ignore[arg-type]
        port = int(url.rsplit(":", 1)[1])
        assert upstream._pools.connection_from_host("127.0.0.1", port, "https").num_connections == 1
    finally:
        upstream.close()
    untrusting = Upstream(connect_timeout_s=5, read_timeout_s=30, pool_size=4)  # the default bundle: not ours
    with pytest.raises(BackendFailed, match="cannot reach the backend at https://127.0.0.1.*CERTIFICATE_VERIFY_FAILED"):
        untrusting.post(lease, "/v1/chat/completions", body)  # type: ignore[arg-type]
    untrusting.close()
