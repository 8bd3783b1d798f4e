"""Fake OpenAI-compatible inference server for the proxy's test suite.

Standard library only. The proxy under test launches it as a child process:

    python tests/fake_backend.py --port 5123 --model fake-a [flags]

It serves /health, /v1/models, /v1/model, /pid, /v1/chat/completions,
/v1/completions and /v1/embeddings. Completion replies echo the request body
(non-stream: "echo" key; stream: "echo" in the first event) so tests can check
what the proxy forwarded. Flags simulate slow starts, start failures, slow or
failing streams, SIGTERM-ignoring processes and API-key protection.

Opt-in flags for the Ollama routes (each off by default):
  --reasoning N      chat streams N reasoning_content deltas ("think0 ", ...) before the content
  --tool-call NAME   a chat request that carries tools is answered with one call of NAME,
                     streamed llama.cpp style (fragments keyed by index: id and name first, then
                     the arguments JSON over three chunks), finish_reason "tool_calls"
  --tabby-style      TabbyAPI-like streams: deltas without "role", usage (with prompt_time and
                     completion_time) inside the finish chunk, a ": ping" comment before the
                     first event
  --crlf             SSE events framed with CRLF line ends
  --record           remember every POST (path and body); GET /requests returns them
  --embedding-dims N each embedding has N numbers (large answers: N=2000000 is about 20 MB each)
  --answer-delay S   a non-stream answer takes S seconds (generating); GET /requests then shows
                     whether the proxy's connection was gone by the time it was ready ("abandoned")
  --echo-uploads     the pass-through routes (rerank, audio, images, token) answer what arrived:
                     path, size, Content-Type and SHA-256 of the body
  --tls CERT KEY     serve HTTPS with this certificate chain and key (PEM files)

Fake VRAM (with FAKE_NVML_DIR set: the fake GPUs of tests/fake_nvml; ignored without it):
  --vram SPEC        after --startup-delay, before serving, take this much memory: "2GiB" on the
                     first device of CUDA_VISIBLE_DEVICES (else GPU 0), or "0:2GiB,1:1GiB" by CUDA
                     index (into CUDA_VISIBLE_DEVICES when set). Sizes: 2GiB, 512MiB, 1.5GiB,
                     1GB (decimal), bytes. If it does not fit: a torch-style "CUDA out of memory"
                     line on stderr and exit status 1. Taken before --exit-during-startup exits
  --vram-release-s S once this process is gone its memory stays used S seconds more
"""

import argparse
import hashlib
import json
import math
import os
import signal
import socket
import ssl
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ARGS = None  # parsed command-line flags, set in main()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--startup-delay", type=float, default=0.0)
    p.add_argument("--exit-during-startup", action="store_true")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--token-delay", type=float, default=0.0)
    p.add_argument("--tokens", type=int, default=5)
    p.add_argument("--error-after", type=int, default=-1)
    p.add_argument("--api-key", default=None)
    p.add_argument("--reasoning", type=int, default=0)
    p.add_argument("--tool-call", default=None)
    p.add_argument("--tabby-style", action="store_true")
    p.add_argument("--crlf", action="store_true")
    p.add_argument("--record", action="store_true")
    p.add_argument("--embedding-dims", type=int, default=3)
    p.add_argument("--answer-delay", type=float, default=0.0)
    p.add_argument("--echo-uploads", action="store_true")
    p.add_argument("--vram", type=parse_vram, default=None)
    p.add_argument("--vram-release-s", type=float, default=0.0)
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), default=None)
    return p.parse_args(argv)


SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
              "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_size(text):
    """Bytes for "2GiB", "512MiB", "1.5GiB", "1GB" (decimal) or "1048576"."""
    number = text.strip().rstrip("BbIiKkMmGgTt")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if unit not in SIZE_UNITS or not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f'expected a size like "2GiB", "512MiB", "1GB" or bytes, got {text!r}')
    return int(value * SIZE_UNITS[unit])


def parse_vram(text):
    """{CUDA device index (None: the first visible one): bytes} for "2GiB" or "0:2GiB,1:1GiB"."""
    if ":" not in text:
        return {None: parse_size(text)}
    need = {}
    for part in text.split(","):
        index, _, size = part.partition(":")
        if not index.strip().isdigit():
            raise argparse.ArgumentTypeError(f'expected "2GiB" or "0:2GiB,1:1GiB", got {text!r}')
        need[int(index)] = need.get(int(index), 0) + parse_size(size)
    return need


def visible_devices():
    """Physical GPU indices in CUDA order: CUDA_VISIBLE_DEVICES's, or None (all, as numbered)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    physical = []
    for entry in visible.split(","):
        entry = entry.strip()
        if not entry.isdigit():
            break  # CUDA ignores the list from the first entry it cannot parse
        physical.append(int(entry))
    return physical


def torch_size(size):
    """A size as torch's out-of-memory message prints it: "2.00 GiB", "512.00 MiB"."""
    for unit, scale in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if size > scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} bytes"


def take_vram(need, release_s):
    """Register this process's VRAM with the fake GPUs, or exit 1 as torch does when it does not fit."""
    folder = os.environ.get("FAKE_NVML_DIR")
    if not folder:
        return
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_nvml"))
    import fake_gpu

    physical = visible_devices()
    if physical == []:
        print("RuntimeError: No CUDA GPUs are available", file=sys.stderr, flush=True)
        sys.exit(1)
    by_physical, logical_of = {}, {}
    for logical, size in need.items():
        logical = 0 if logical is None else logical
        if physical is not None and logical >= len(physical):
            print("RuntimeError: CUDA error: invalid device ordinal", file=sys.stderr, flush=True)
            sys.exit(1)
        index = logical if physical is None else physical[logical]
        by_physical[index] = by_physical.get(index, 0) + size
        logical_of[index] = logical
    short = fake_gpu.allocate(os.getpid(), by_physical, release_s, folder)
    if short is None:
        print("vram: " + ", ".join(f"{torch_size(size)} on GPU {index}" for index, size in sorted(by_physical.items())),
              flush=True)
        return
    state = fake_gpu.devices(folder)
    if short >= len(state):
        print("RuntimeError: CUDA error: invalid device ordinal", file=sys.stderr, flush=True)
        sys.exit(1)
    device = state[short]
    print(f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {torch_size(by_physical[short])}. "
          f"GPU {logical_of[short]} has a total capacity of {torch_size(device['total'])} of which "
          f"{torch_size(device['free'])} is free. Including non-PyTorch memory, this process has 0 bytes "
          "memory in use.", file=sys.stderr, flush=True)
    sys.exit(1)


ECHOED = ("/v1/rerank", "/rerank", "/v1/audio/transcriptions", "/v1/audio/speech", "/v1/images/generations",
          "/v1/token/encode", "/v1/token/decode")
RECORDED = []  # with --record: {"path", "body"} of every POST, oldest first
TOOL_ARGUMENTS = {"city": "Tokyo", "days": 2}
TABBY_TIMES = {"prompt_time": 0.5, "completion_time": 1.25}  # seconds, as TabbyAPI reports them


class Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


def error_body(message, type_, code):
    return {"error": {"message": message, "type": type_, "code": code}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeBackend/1.0"

    def log_message(self, format, *args):
        super().log_message(format, *args)
        sys.stderr.flush()

    # ---- helpers -------------------------------------------------------
    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def abandoned_within(self, seconds):
        """Wait up to `seconds` as a generating server would; True as soon as the client hung up."""
        import select
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                return True
        return False

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # skip trailers
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after chunk data
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def authorized(self):
        key = ARGS.api_key
        if not key:
            return True
        return (self.headers.get("Authorization", "") == f"Bearer {key}"
                or self.headers.get("x-api-key", "") == key)

    def write_chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def send_event(self, obj):
        payload = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        end = "\r\n" if ARGS.crlf else "\n"
        self.write_chunk(f"data: {payload}{end}{end}".encode())

    # ---- routing -------------------------------------------------------
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            return self.send_json(200, {"status": "ok"})
        if not self.authorized():
            return self.send_json(401, error_body("Invalid API Key", "authentication_error", 401))
        if path == "/v1/models":
            return self.send_json(200, {"object": "list", "data": [
                {"id": ARGS.model, "object": "model", "owned_by": "fake"}]})
        if path == "/v1/model":
            return self.send_json(200, {"id": ARGS.model, "object": "model"})
        if path == "/pid":
            return self.send_json(200, {"pid": os.getpid()})
        if path == "/requests" and ARGS.record:
            return self.send_json(200, {"requests": RECORDED})
        self.send_json(404, error_body("not found", "not_found", 404))

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        raw = self.read_body()  # always drain the body to keep the connection usable
        if path == "/health":
            return self.send_json(200, {"status": "ok"})
        if not self.authorized():
            return self.send_json(401, error_body("Invalid API Key", "authentication_error", 401))
        if ARGS.echo_uploads and path in ECHOED:
            return self.send_json(200, {"path": self.path, "received_bytes": len(raw),
                                        "content_type": self.headers.get("Content-Type", ""),
                                        "sha256": hashlib.sha256(raw).hexdigest()})
        if path not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            return self.send_json(404, error_body("not found", "not_found", 404))
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("body is not an object")
        except ValueError:
            return self.send_json(400, error_body("invalid JSON", "invalid_request_error", 400))
        if ARGS.record:
            RECORDED.append({"path": path, "body": body})
        if isinstance(body.get("fake_status"), int):  # tests ask for an upstream error status
            status = body["fake_status"]
            return self.send_json(status, error_body(f"fake error {status}", "invalid_request_error", status))
        if path == "/v1/embeddings":
            return self.embeddings(body)
        chat = path == "/v1/chat/completions"
        n = ARGS.tokens
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] < n:
            n = max(body["max_tokens"], 0)
        tokens = [f"tok{i} " for i in range(n)]
        if body.get("stream") is True:
            try:
                self.stream(body, chat, tokens)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # client went away: stop quietly
            return
        if ARGS.answer_delay > 0 and self.abandoned_within(ARGS.answer_delay):
            RECORDED.append({"path": self.path, "abandoned": True})
            self.close_connection = True
            return
        usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
        if ARGS.tabby_style:
            usage.update(TABBY_TIMES)
        text = "".join(tokens)
        if chat and ARGS.tool_call and body.get("tools"):
            obj, choice = "chat.completion", {
                "index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_fake0", "type": "function",
                    "function": {"name": ARGS.tool_call, "arguments": json.dumps(TOOL_ARGUMENTS)}}]},
                "finish_reason": "tool_calls"}
        elif chat:
            message = {"role": "assistant", "content": text}
            if ARGS.reasoning > 0:
                message["reasoning_content"] = "".join(f"think{i} " for i in range(ARGS.reasoning))
            obj, choice = "chat.completion", {"index": 0, "message": message, "finish_reason": "stop"}
        else:
            obj, choice = "text_completion", {"index": 0, "text": text, "finish_reason": "stop"}
        self.send_json(200, {"id": "chatcmpl-fake" if chat else "cmpl-fake", "object": obj,
                             "created": int(time.time()), "model": ARGS.model,
                             "choices": [choice], "usage": usage, "echo": body})

    def do_other(self):
        self.read_body()
        self.send_json(404, error_body("not found", "not_found", 404))

    do_PUT = do_DELETE = do_PATCH = do_other

    def embeddings(self, body):
        inp = body.get("input", "")
        inputs = inp if isinstance(inp, list) else [inp]
        self.send_json(200, {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": ([0.1, 0.2, 0.3] * ARGS.embedding_dims)[:ARGS.embedding_dims]}
                     for i in range(len(inputs))],
            "model": ARGS.model,
            "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    def stream(self, body, chat, tokens):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        created = int(time.time())
        base = {"id": "chatcmpl-fake" if chat else "cmpl-fake",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": ARGS.model}

        def chunk(delta_or_text, finish=None, **extra):
            if chat:
                choice = {"index": 0, "delta": delta_or_text, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_or_text, "finish_reason": finish}
            return {**base, "choices": [choice], **extra}

        if ARGS.tabby_style:  # sse-starlette's keep-alive comment
            self.write_chunk(b": ping\r\n\r\n" if ARGS.crlf else b": ping\n\n")
        first = True
        if chat and not ARGS.tabby_style:  # TabbyAPI deltas carry no role
            self.send_event(chunk({"role": "assistant", "content": ""}, echo=body))
            first = False
        for i in range(ARGS.reasoning if chat else 0):
            payload = chunk({"reasoning_content": f"think{i} "})
            if first:
                payload["echo"], first = body, False
            self.send_event(payload)
        if chat and ARGS.tool_call and body.get("tools"):
            return self.stream_tool_call(body, chat, base, chunk, first)
        for i, tok in enumerate(tokens):
            if i == ARGS.error_after:
                break
            payload = chunk({"content": tok} if chat else tok)
            if first:
                payload["echo"], first = body, False
            self.send_event(payload)
            if ARGS.token_delay > 0:
                time.sleep(ARGS.token_delay)
        if 0 <= ARGS.error_after <= len(tokens):
            if first:  # no event sent yet: still expose the echo
                self.send_event({**base, "choices": [], "echo": body})
            self.send_event(error_body("simulated failure", "server_error", 500))
            self.write_chunk(b"")  # end the stream without [DONE]
            return
        self.finish_stream(body, chat, base, chunk, first, "stop", len(tokens))

    def finish_stream(self, body, chat, base, chunk, first, finish, n):
        """Send the finish chunk, the usage (own chunk, or inside the finish chunk TabbyAPI-style), [DONE]."""
        opts = body.get("stream_options")
        usage = None
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
        extra = {"echo": body} if first else {}
        if ARGS.tabby_style and usage is not None:
            extra["usage"] = {**usage, **TABBY_TIMES}
            usage = None
        self.send_event(chunk({} if chat else "", finish=finish, **extra))
        if usage is not None:
            self.send_event({**base, "choices": [], "usage": usage})
        self.send_event("[DONE]")
        self.write_chunk(b"")

    def stream_tool_call(self, body, chat, base, chunk, first):
        """Stream one call of --tool-call as llama.cpp does: fragments keyed by index."""
        arguments = json.dumps(TOOL_ARGUMENTS)
        cut = [0, len(arguments) // 3, 2 * len(arguments) // 3, len(arguments)]
        deltas = [{"tool_calls": [{"index": 0, "id": "call_fake0", "type": "function",
                                   "function": {"name": ARGS.tool_call, "arguments": ""}}]}]
        deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": arguments[start:end]}}]}
                   for start, end in zip(cut, cut[1:])]
        for delta in deltas:
            payload = chunk(delta)
            if first:
                payload["echo"], first = body, False
            self.send_event(payload)
        self.finish_stream(body, chat, base, chunk, first, "tool_calls", len(deltas))


def main(argv=None):
    global ARGS
    ARGS = parse_args(argv)

    def on_signal(signum, frame):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # prompt exit even with streams open

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if ARGS.ignore_sigterm else on_signal)

    if ARGS.startup_delay > 0:
        time.sleep(ARGS.startup_delay)
    if ARGS.vram is not None:
        take_vram(ARGS.vram, ARGS.vram_release_s)
    if ARGS.exit_during_startup:
        print("fatal: simulated start failure", file=sys.stderr, flush=True)
        sys.exit(3)

    server = Server(("127.0.0.1", ARGS.port), Handler)
    if ARGS.tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*ARGS.tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"listening 127.0.0.1:{ARGS.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
