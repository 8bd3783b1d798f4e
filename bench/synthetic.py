"""A synthetic OpenAI-compatible SSE server for the benchmark: fast, paced on demand, standard library only.

Run as a script (the proxy starts it through a `command` profile, the benchmark starts the very same
command itself to measure direct):

    python bench/synthetic.py --port 5123 --model synth [--chunks 16] [--token-rate 0]

Routes: GET /health, GET /v1/models, POST /v1/chat/completions and /v1/completions (stream and
non-stream), and GET /x/connections: `{"accepted": N}`, the connections accepted so far (how a
benchmark sees whether its client, the proxy, reuses connections; the asking connection counts too). Streams use chunked transfer encoding, one HTTP chunk (and one send) per SSE event, so
a relay sees exactly what a token-by-token server sends.

Per request, `max_tokens` sets the number of content chunks and `x_token_rate` the pace in tokens per
second (0: as fast as the socket takes them); the flags give the defaults. Each streamed event carries
`x_seq` (its index) and `x_t` (time.monotonic() when it was sent; CLOCK_MONOTONIC is system-wide on
Linux, so a client on the same machine can compute each event's one-way delivery time).

A plain thread per connection and raw sockets: no http.server, no framework, nothing that costs
per-chunk time beyond one string format and one send. SIGTERM ends the process at once (the default
action), which keeps its own stop time near zero.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from typing import Any

MAX_HEADER_BYTES = 65536
DONE_EVENT = b"data: [DONE]\n\n"
DONE_AND_END = b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE_EVENT), DONE_EVENT)  # the last event, then the end of the body


class Settings:
    """The defaults from the command line, and the count of accepted connections."""

    def __init__(self, model: str, chunks: int, token_rate: float) -> None:
        self.model = model
        self.model_json = json.dumps(model).encode()
        self.chunks = chunks
        self.token_rate = token_rate
        self.accepted = 0  # written by the accept loop only; the connection threads only read it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Synthetic OpenAI-compatible SSE server (benchmark upstream).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default="synth", help="the model id it serves")
    parser.add_argument("--chunks", type=int, default=16, help="content chunks when a request sets no max_tokens")
    parser.add_argument("--token-rate", type=float, default=0.0, help="tokens per second (0: unpaced)")
    args = parser.parse_args(argv)
    settings = Settings(args.model, args.chunks, args.token_rate)

    listener = socket.create_server((args.host, args.port), backlog=1024)
    print(f"synthetic: listening on {args.host}:{args.port} model={args.model}", flush=True)
    try:
        while True:
            conn, _ = listener.accept()
            settings.accepted += 1
            threading.Thread(target=_serve_connection, args=(conn, settings), daemon=True).start()
    except KeyboardInterrupt:
        return 0
    finally:
        listener.close()


def _serve_connection(conn: socket.socket, settings: Settings) -> None:
    """Serve HTTP/1.1 requests on one connection until the peer closes it."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pending = b""
    try:
        while True:
            request = _read_request(conn, pending)
            if request is None:
                return
            method, path, headers, body, pending = request
            keep_alive = headers.get("connection", "").lower() != "close"
            if not _respond(conn, settings, method, path, body, keep_alive) or not keep_alive:
                return
    except OSError:
        return  # the peer left mid-answer (a client disconnect): nothing to report
    finally:
        conn.close()


def _read_request(conn: socket.socket, pending: bytes) -> tuple[str, str, dict[str, str], bytes, bytes] | None:
    """Return (method, path, headers, body, bytes of the next request) or None at end of stream."""
    data = pending
    while (end := data.find(b"\r\n\r\n")) < 0:
        if len(data) > MAX_HEADER_BYTES:
            return None
        more = conn.recv(65536)
        if not more:
            return None
        data += more
    head, data = data[:end].decode("latin-1"), data[end + 4:]
    request_line, *header_lines = head.split("\r\n")
    method, path, _version = (request_line.split(" ", 2) + ["", ""])[:3]
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body, data = _read_chunked_body(conn, data)
    else:
        length = int(headers.get("content-length") or 0)
        while len(data) < length:
            more = conn.recv(max(65536, length - len(data)))
            if not more:
                return None
            data += more
        body, data = data[:length], data[length:]
    return method, path.split("?", 1)[0], headers, body, data


def _read_chunked_body(conn: socket.socket, data: bytes) -> tuple[bytes, bytes]:
    """Return (body, leftover) of a chunked request body."""
    parts: list[bytes] = []
    while True:
        while (line_end := data.find(b"\r\n")) < 0:
            data += _recv_or_fail(conn)
        size = int(data[:line_end].split(b";")[0].strip() or b"0", 16)
        data = data[line_end + 2:]
        if size == 0:
            while (trailer_end := data.find(b"\r\n")) < 0:
                data += _recv_or_fail(conn)
            if trailer_end == 0:
                return b"".join(parts), data[2:]
            data = data[trailer_end + 2:]  # a trailer line; keep reading until the empty one
            continue
        while len(data) < size + 2:
            data += _recv_or_fail(conn)
        parts.append(data[:size])
        data = data[size + 2:]


def _recv_or_fail(conn: socket.socket) -> bytes:
    more = conn.recv(65536)
    if not more:
        raise ConnectionError("the client closed the connection inside a chunked body")
    return more


def _send_json(conn: socket.socket, status: int, obj: Any, keep_alive: bool) -> bool:
    data = json.dumps(obj, separators=(",", ":")).encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode()
    conn.sendall(head + data)
    return True


def _respond(conn: socket.socket, settings: Settings, method: str, path: str, raw: bytes, keep_alive: bool) -> bool:
    if method == "GET" and path == "/health":
        return _send_json(conn, 200, {"status": "ok"}, keep_alive)
    if method == "GET" and path == "/x/connections":
        return _send_json(conn, 200, {"accepted": settings.accepted}, keep_alive)
    if method == "GET" and path == "/v1/models":
        card = {"id": settings.model, "object": "model", "owned_by": "bench"}
        return _send_json(conn, 200, {"object": "list", "data": [card]}, keep_alive)
    if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
        return _send_json(conn, 404, {"error": {"message": f"no route {method} {path}", "code": 404}}, keep_alive)
    try:
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except ValueError:
        return _send_json(conn, 400, {"error": {"message": "invalid JSON body", "code": 400}}, keep_alive)
    chunks = body.get("max_tokens")
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 0:
        chunks = settings.chunks
    rate = body.get("x_token_rate")
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate < 0:
        rate = settings.token_rate
    chat = path == "/v1/chat/completions"
    if body.get("stream") is True:
        include_usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage") is True
        _stream(conn, settings, chat, chunks, float(rate), include_usage)
        return True
    text = "".join(f"tok{index} " for index in range(chunks))
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                              if chat else {"index": 0, "text": text, "finish_reason": "stop"})
    answer = {"id": "chatcmpl-bench" if chat else "cmpl-bench", "object": "chat.completion" if chat else "text_completion",
              "created": int(time.time()), "model": settings.model, "choices": [choice],
              "usage": {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks}}
    return _send_json(conn, 200, answer, keep_alive)


def _stream(conn: socket.socket, settings: Settings, chat: bool, chunks: int, rate: float, include_usage: bool) -> None:
    """Send one SSE event per HTTP chunk: a role event, `chunks` tokens, a finish event, [DONE]."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                 b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n")
    created = int(time.time())
    if chat:
        head = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":%d,"model":%s,'
                % (created, settings.model_json))
        token = b'"choices":[{"index":0,"delta":{"content":"tok%d "},"finish_reason":null}]}\n\n'
        first = b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
        last = b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    else:
        head = b'data: {"id":"cmpl-bench","object":"text_completion","created":%d,"model":%s,' % (created, settings.model_json)
        token = b'"choices":[{"index":0,"text":"tok%d ","finish_reason":null}]}\n\n'
        first = b'"choices":[{"index":0,"text":"","finish_reason":null}]}\n\n'
        last = b'"choices":[{"index":0,"text":"","finish_reason":"stop"}]}\n\n'
    stamp = b'"x_seq":%d,"x_t":%.6f,'
    send = conn.sendall
    clock = time.monotonic
    interval = 1.0 / rate if rate > 0 else 0.0
    started = clock()
    event = head + stamp % (0, started) + first
    send(b"%x\r\n%s\r\n" % (len(event), event))
    for index in range(chunks):
        if interval:  # token i leaves at started + i * interval: pacing never drifts
            delay = started + index * interval - clock()
            if delay > 0:
                time.sleep(delay)
        event = head + stamp % (index + 1, clock()) + token % index
        send(b"%x\r\n%s\r\n" % (len(event), event))
    event = head + stamp % (chunks + 1, clock()) + last
    send(b"%x\r\n%s\r\n" % (len(event), event))
    if include_usage:
        usage = b'"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (chunks, chunks + 8)
        event = head + stamp % (chunks + 2, clock()) + usage
        send(b"%x\r\n%s\r\n" % (len(event), event))
    send(DONE_AND_END)


if __name__ == "__main__":
    sys.exit(main())
