"""Connections and requests still arriving, through the real proxy.py with raw sockets: idle and
trickling connections without a key cannot lock a keyed client out, requests that arrive too
slowly are cut, a body without a key is refused before it is sent, and Content-Length with
Transfer-Encoding is refused and the connection closed (RFC 9112 section 6.3).
"""

from __future__ import annotations

import http.client
import json
import resource
import socket
import threading
import time
from collections.abc import Callable

import pytest
import requests

from tests.conftest import API_KEY, FIGURES, ProxyProcess, fake_profile

Start = Callable[..., ProxyProcess]


def connect(proxy: ProxyProcess, timeout_s: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout_s)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response with a Content-Length body; return status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"connection closed before a response: {data!r}"
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        piece = sock.recv(65536)
        assert piece, "connection closed in the middle of the body"
        body += piece
    return int(lines[0].split(" ")[1]), headers, body


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """Say whether the proxy closes the connection within timeout_s (reading and dropping any bytes)."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_many_idle_connections_without_a_key_do_not_lock_out_a_keyed_client(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    idle = [connect(proxy) for _ in range(150)]  # waitress's default connection_limit was 100
    trickling = [connect(proxy) for _ in range(20)]
    try:
        for sock in trickling:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n")  # headers never finished
        started = time.monotonic()
        fresh = requests.Session()  # a new connection: proxy.http may hold one accepted before the flood
        fresh.trust_env = False
        answer = fresh.get(proxy.url + "/v1/models", headers=proxy.headers(), timeout=10)
        assert answer.status_code == 200
        body = {"model": "fake", "messages": [{"role": "user", "content": "x"}]}
        assert fresh.post(proxy.url + "/v1/chat/completions", json=body, headers=proxy.headers(),
                          timeout=10).status_code == 200
        FIGURES["keyless_connections_held_while_keyed_requests_answer"] = len(idle) + len(trickling)
        FIGURES["keyed_requests_answered_beside_them_s"] = round(time.monotonic() - started, 3)
        fresh.close()
    finally:
        for sock in idle + trickling:
            sock.close()


def test_connections_past_1024_descriptors_do_not_stop_the_server(start_proxy: Start) -> None:
    # waitress's default select() loop dies on a descriptor >= 1024 (ValueError), and with it the server.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1500:
        if hard != resource.RLIM_INFINITY and hard < 1500:
            pytest.skip(f"needs 1500 open files for the test's own sockets; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1500, hard))
    proxy = start_proxy({"fake": fake_profile()}, proxy={"connection_limit": 1200})
    held = [connect(proxy) for _ in range(1100)]
    try:
        fresh = requests.Session()
        fresh.trust_env = False
        assert fresh.get(proxy.url + "/v1/models", headers=proxy.headers(), timeout=10).status_code == 200
        fresh.close()
    finally:
        for sock in held:
            sock.close()
    assert "out of range" not in proxy.log()
    assert proxy.http.get(proxy.url + "/health", timeout=10).status_code == 200


def test_a_request_whose_headers_trickle_in_is_cut_after_header_timeout(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()}, proxy={"header_timeout": 2})
    sock = connect(proxy)
    stop = threading.Event()

    def trickle() -> None:  # one byte every 0.2 s: waitress's idle timeout alone never fires
        try:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\nX-Slow: ")
            while not stop.wait(0.2):
                sock.sendall(b"a")
        except OSError:
            pass  # closed by the proxy

    sender = threading.Thread(target=trickle)
    started = time.monotonic()
    sender.start()
    try:
        assert closed_by_peer(sock, timeout_s=15), "the trickling request was never cut"
        waited = time.monotonic() - started
        assert 1.5 < waited < 12
        assert "proxy.header_timeout" in proxy.log()
    finally:
        stop.set()
        sender.join(5)
        sock.close()


def test_a_body_that_trickles_in_is_cut_after_body_timeout(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()}, proxy={"body_timeout": 2})
    sock = connect(proxy)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Length: 100000\r\n"
                     b"Authorization: " + proxy.headers()["Authorization"].encode() + b"\r\n\r\n{")
        started = time.monotonic()
        assert closed_by_peer(sock, timeout_s=15), "the unfinished body was never cut"
        assert 1.5 < time.monotonic() - started < 12
        assert "proxy.body_timeout" in proxy.log()
    finally:
        sock.close()


@pytest.mark.parametrize(("path", "authorization"), [
    pytest.param("/v1/chat/completions", b"", id="openai-no-key"),
    pytest.param("/api/chat", b"", id="ollama-no-key"),
    pytest.param("/v1/chat/completions", b"Authorization: Bearer not-a-valid-key-123\r\n", id="openai-wrong-key"),
])
def test_a_body_without_a_valid_key_is_refused_before_it_is_sent(start_proxy: Start, path: str,
                                                                  authorization: bytes) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    sock = connect(proxy)
    try:
        # 60 MB announced, nothing sent: the answer must come from the headers alone.
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                     + authorization + b"Content-Length: 60000000\r\n\r\n")
        status, headers, body = read_response(sock)
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert headers["connection"] == "close" and headers["content-type"] == "application/json"
        error = json.loads(body)["error"]
        if path.startswith("/api/"):
            assert isinstance(error, str)
        else:
            assert set(error) == {"message", "type", "code", "param"} and error["code"] == "unauthorized"
        assert closed_by_peer(sock, timeout_s=5)
    finally:
        sock.close()
    assert proxy.backends() == []  # nothing was loaded for it


def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    body = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "x"}]}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    for path in ("/v1/chat/completions", "/api/chat"):
        sock = connect(proxy)
        try:
            sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: proxy\r\n"
                         b"Authorization: " + proxy.headers()["Authorization"].encode() + b"\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
            status, headers, answer = read_response(sock)
            assert status == 400 and headers["connection"] == "close"
            error = json.loads(answer)["error"]
            assert "Transfer-Encoding" in (error if isinstance(error, str) else error["message"])
            assert closed_by_peer(sock, timeout_s=5)
        finally:
            sock.close()
    # the same request with one framing header is served
    sock = connect(proxy)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
                     b"Authorization: " + proxy.headers()["Authorization"].encode() + b"\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
        assert read_response(sock)[0] == 200
    finally:
        sock.close()


def _stream_over(connection: http.client.HTTPConnection, path: str, body: dict[str, object]) -> tuple[int, str, bytes]:
    connection.request("POST", path, body=json.dumps(body), headers={
        "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.getheader("Connection") or "", response.read()


def test_a_client_connection_stays_open_across_streamed_requests_in_both_dialects(start_proxy: Start) -> None:
    proxy = start_proxy({"alpha": fake_profile("--tokens", "3")})
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    messages = [{"role": "user", "content": "hi"}]
    try:
        sockets = []
        for path, body in [("/v1/chat/completions", {"model": "alpha", "stream": True, "messages": messages}),
                           ("/api/chat", {"model": "alpha", "messages": messages}),  # NDJSON, streamed
                           ("/v1/chat/completions", {"model": "alpha", "stream": True, "messages": messages}),
                           ("/v1/chat/completions", {"model": "alpha", "messages": messages})]:
            status, close, answer = _stream_over(connection, path, body)
            assert status == 200 and close.lower() != "close", (path, close)
            assert answer.rstrip().endswith((b"data: [DONE]", b"}"))
            sockets.append(connection.sock)
        assert all(sock is sockets[0] for sock in sockets)  # one connection for all four: no reconnect
        FIGURES["client_connections_for_4_streamed_requests"] = 1
    finally:
        connection.close()


BREAKS_OFF = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{}")
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "3000000"); self.end_headers()
        self.wfile.write(b" " * 1500000); self.wfile.flush(); self.close_connection = True
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_a_plain_answer_that_breaks_off_is_cut_not_completed(start_proxy: Start) -> None:
    # A large non-stream answer passes through as it arrives (chunked to the client); when the backend
    # breaks off, the client must see a cut body, never a complete one, even on a kept-alive connection.
    profile = {"backend": "command", "command": {"cmd": ["${PYTHON}", "-c", BREAKS_OFF, "${PORT}"]}}
    proxy = start_proxy({"broken": profile})
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": "broken", "messages": [{"role": "user", "content": "hi"}]}),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    finally:
        connection.close()
