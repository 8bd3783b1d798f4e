"""Stand-in for TabbyAPI's main.py (theroyallab/tabbyAPI, ExLlamaV3 era) for the proxy's test suite.

Real TabbyAPI needs a CUDA GPU; this needs the standard library and PyYAML and follows the contract in
shared/reference/tabbyapi.md. make_tabby_dir() builds a "TabbyAPI folder" whose main.py runs this file, so
the proxy's `python main.py --config FILE` (cwd = that folder) starts it.

- Config: ./config.yml with the --config file deep-merged over it (the file wins; no other flags are read).
- Startup as TabbyAPI: port check by TCP connect (busy: port+1; both busy: log an error, exit 0), load
  model.model_name while the port stays closed, read or create api_tokens.yml, only then bind.
- Routes: /health, /v1/auth/permission, /v1/model, /v1/models (= /v1/model/list), /v1/model/load (SSE
  progress), /v1/model/unload, /v1/chat/completions, /v1/completions; auth by x-api-key, x-admin-key or
  Bearer; FastAPI-style errors ({"detail": ...}; 422 with a list for invalid bodies, invalid JSON too).
- SSE as sse-starlette: CRLF line ends, a `: ping - <time>` comment first and then every
  network.sse_ping_interval seconds (0 = none), chat deltas without "role", completions chunks keyed
  "model_name", `data: [DONE]` last. Usage only with stream_options.include_usage (non-stream too); in a
  stream it rides in the final chunk `choices: [{"index":0,"delta":{},"finish_reason":...}]`.
- Replies carry "echo", the request body as received: top level (non-stream) or in the first event.

A `stand_in:` config section (TabbyAPI ignores unknown sections) selects failure modes:
  load_delay (0.2)        seconds a load takes, at startup and over the API
  exit_during_load        traceback on stderr, exit 1 during the startup load (a string: its message)
  hang_during_load        the startup load never ends; the port is never bound
  crash_after_tokens: N   os._exit(1) after N content chunks (non-stream: instead of replying)
  stream_error_after: N   in-stream error event after N chunks and no [DONE] (non-stream: 503)
  ignore_sigterm          SIGTERM is ignored (SIGINT still exits 0)
  load_fail_models: [..]  an API load of these names ends with an error event; no model stays loaded
  token_delay (0), prefill_delay (0)   seconds between chunks / before the first one (pings go on)
  tokens (5), reply ("")  the content: reply + "tok0 ", then "tok1 ", ... (max_tokens cuts: "length")
"""

import argparse
import json
import os
import secrets
import select
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import yaml

DEFAULTS = {
    "network": {"host": "127.0.0.1", "port": 5000, "disable_auth": False, "sse_ping_interval": 15},
    "model": {"model_dir": "models", "model_name": None, "max_seq_len": -1, "cache_mode": "FP16"},
    "stand_in": {"load_delay": 0.2, "exit_during_load": False, "hang_during_load": False,
                 "crash_after_tokens": None, "stream_error_after": None, "ignore_sigterm": False,
                 "load_fail_models": [], "token_delay": 0.0, "prefill_delay": 0.0, "tokens": 5, "reply": ""},
}
CFG = {}  # the merged config, set in main()
STATE = {"model": None, "params": {}, "epoch": 0, "tokens": {}, "tokens_mtime": None}
LOAD_LOCK = threading.Lock()  # API loads are serialised, as in TabbyAPI
NOT_LOADED = {"detail": "No models are currently loaded."}
EOS = {"stop": "stop_token", "length": "max_new_tokens"}  # finish_reason -> eos_reason


def log(line, err=False):
    print(line, file=sys.stderr if err else sys.stdout, flush=True)


def deep_merge(base, over):
    out = dict(base)
    for key, value in (over or {}).items():
        nested = isinstance(out.get(key), dict) and (isinstance(value, dict) or value is None)
        out[key] = deep_merge(out[key], value) if nested else value
    return out


def read_yaml(path):
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return data if isinstance(data, dict) else {}


def opt(key):
    value = CFG["stand_in"].get(key)
    return DEFAULTS["stand_in"][key] if value is None else value


def model_dir():
    return Path(CFG["model"].get("model_dir") or "models")


def port_in_use(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # TabbyAPI's is_port_in_use
        s.settimeout(1)
        return s.connect_ex(("localhost", port)) == 0


def model_params(name, request):
    """The card's "parameters", from a load request or the config's model section."""
    seq = request.get("max_seq_len")
    if not isinstance(seq, int) or seq <= 0:
        try:
            seq = json.loads((model_dir() / name / "config.json").read_text())["max_position_embeddings"]
        except (OSError, ValueError, KeyError, TypeError):
            seq = 4096
    return {"max_seq_len": seq, "cache_size": request.get("cache_size") or seq,
            "cache_mode": request.get("cache_mode") or "FP16", "rope_scale": 1.0, "rope_alpha": 1.0,
            "max_batch_size": 256, "chunk_size": 2048, "prompt_template": "chatml",
            "prompt_template_content": None, "use_vision": False, "draft": None}


def key_level(key):
    """'admin', 'api' or None for a presented key; api_tokens.yml is re-read when its mtime changes."""
    try:
        mtime = os.stat("api_tokens.yml").st_mtime
        if mtime != STATE["tokens_mtime"]:
            STATE["tokens"], STATE["tokens_mtime"] = read_yaml("api_tokens.yml"), mtime
    except (OSError, yaml.YAMLError):
        pass
    api_keys = STATE["tokens"].get("api_key")
    api_keys = api_keys if isinstance(api_keys, list) else [api_keys]
    admin_key = STATE["tokens"].get("admin_key")
    if key and admin_key is not None and key == str(admin_key):
        return "admin"
    return "api" if key and key in [str(k) for k in api_keys if k is not None] else None


def bearer(header):
    parts = (header or "").split(" ")
    return parts[1] if len(parts) >= 2 and parts[0].lower() == "bearer" else None


def invalid(kind, loc, msg, value=None, **extra):
    return {"detail": [{"type": kind, "loc": ["body", *loc], "msg": msg, "input": value, **extra}]}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "uvicorn"
    ROUTES = {("GET", "/health"): (None, "health"), ("GET", "/v1/auth/permission"): ("api", "permission"),
              ("GET", "/v1/model"): ("api", "card"), ("GET", "/v1/models"): ("api", "list"),
              ("GET", "/v1/model/list"): ("api", "list"), ("POST", "/v1/model/load"): ("admin", "load"),
              ("POST", "/v1/model/unload"): ("admin", "unload"),
              ("POST", "/v1/chat/completions"): ("api", "generate"), ("POST", "/v1/completions"): ("api", "generate")}

    def log_message(self, format, *args):  # request lines only: never headers, so never keys
        super().log_message(format, *args)
        sys.stderr.flush()

    # ---- plumbing ----------------------------------------------------------------------------
    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_json(self, status, obj, content_type="application/json"):
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.write(data)

    def write(self, data):
        if self.alive:
            try:
                self.wfile.write(data)
                self.wfile.flush()
            except OSError:  # the client went away: stop quietly
                self.alive, self.close_connection = False, True

    def client_gone(self):
        try:
            readable = select.select([self.connection], [], [], 0)[0]
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def sse_start(self):
        self.send_response(200)
        for name, value in (("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-store"),
                            ("X-Accel-Buffering", "no"), ("Transfer-Encoding", "chunked")):
            self.send_header(name, value)
        self.end_headers()
        self.interval = float(CFG["network"].get("sse_ping_interval") or 0)
        if self.interval > 0:
            self.ping()

    def chunk(self, text):  # "" ends the chunked body
        data = text.encode()
        self.write(b"%x\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n")

    def ping(self):
        self.last_ping = time.monotonic()
        self.chunk(f": ping - {datetime.now(timezone.utc)}\r\n\r\n")

    def event(self, obj):
        self.chunk("data: " + (obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)) + "\r\n\r\n")

    def wait(self, seconds, watch=True):
        """Sleep, pinging on time; with watch, False as soon as the client is gone."""
        end = time.monotonic() + max(float(seconds or 0), 0)
        while (now := time.monotonic()) < end:
            if watch and (not self.alive or self.client_gone()):
                return False
            if self.interval > 0 and now - self.last_ping >= self.interval:
                self.ping()
            time.sleep(min(0.02, end - now))
        return self.alive

    # ---- routing and auth --------------------------------------------------------------------
    def dispatch(self):
        self.alive, path = True, urlsplit(self.path).path
        raw = self.read_body()
        level, name = self.ROUTES.get((self.command, path), (None, None))
        if name is None:
            return self.send_json(404, {"detail": "Not Found"})
        if name == "health":  # no auth; it never reflects the load state
            return self.send_json(200, {"status": "healthy", "issues": []})
        error = self.auth_error(level == "admin") if level else None
        if error:
            return self.send_json(401, {"detail": error})
        return getattr(self, "r_" + name)(raw, path)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = dispatch

    def auth_error(self, admin):
        if CFG["network"].get("disable_auth"):
            return None
        x_admin, x_api, auth = (self.headers.get(h) for h in ("x-admin-key", "x-api-key", "authorization"))
        if admin:
            if x_admin or auth:
                return None if key_level(x_admin or bearer(auth)) == "admin" else "Invalid admin key"
            return "Please provide an admin key"
        if x_admin and key_level(x_admin) == "admin":
            return None
        if x_api or auth:
            return None if key_level(x_api or bearer(auth)) else "Invalid API key"
        return "Please provide an API key"

    def level(self):
        if CFG["network"].get("disable_auth"):
            return "admin"
        h = self.headers
        return key_level(h.get("x-admin-key") or h.get("x-api-key") or bearer(h.get("authorization")))

    def parse_body(self, raw):
        """The request's JSON object, or None after sending FastAPI's 422."""
        if not raw.strip():
            error = invalid("missing", [], "Field required")
        else:
            try:
                body = json.loads(raw)
                if isinstance(body, dict):
                    return body
                error = invalid("model_attributes_type", [],
                                "Input should be a valid dictionary or object to extract fields from", body)
            except ValueError as exc:
                error = invalid("json_invalid", [getattr(exc, "pos", 0)], "JSON decode error", {},
                                ctx={"error": getattr(exc, "msg", str(exc))})
        self.send_json(422, error)
        return None

    # ---- routes ------------------------------------------------------------------------------
    def r_permission(self, raw, path):
        level = self.level()  # x-admin-key, then x-api-key, then authorization: the first one present counts
        if not level:
            return self.send_json(400, {"detail": "The provided authentication key is invalid."})
        self.send_json(200, {"permission": level})

    @staticmethod
    def model_card(name, **extra):
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "tabbyAPI", **extra}

    def r_card(self, raw, path):
        if not STATE["model"]:
            return self.send_json(503, NOT_LOADED)
        self.send_json(200, self.model_card(STATE["model"], parameters=STATE["params"]))

    def r_list(self, raw, path):
        if self.level() == "admin":  # an admin key sees every folder, an api key only the loaded model
            names = sorted(p.name for p in model_dir().iterdir() if p.is_dir()) if model_dir().is_dir() else []
        else:
            names = [STATE["model"]] if STATE["model"] else []
        self.send_json(200, {"object": "list", "data": [self.model_card(n) for n in names]})

    def r_unload(self, raw, path):
        if not STATE["model"]:
            return self.send_json(503, NOT_LOADED)
        log(f"INFO:     Unloading model {STATE['model']}")
        STATE.update(model=None, params={}, epoch=STATE["epoch"] + 1)  # running jobs are cancelled at once
        self.send_json(200, b"null")

    def r_load(self, raw, path):
        body = self.parse_body(raw)
        if body is None:
            return
        name = body.get("model_name")
        if not name or not isinstance(name, str):
            return self.send_json(400, {"detail": "A model name was not provided for load."})
        if not (model_dir() / name).is_dir():
            return self.send_json(400, {"detail": "Could not find the model path for load. "
                                                  "Check model name or config.yml?"})
        self.sse_start()
        with LOAD_LOCK:  # a client disconnect does not cancel the load: it goes on, writes are dropped
            if STATE["model"] == name:
                self.event({"model_type": "model", "module": 1, "modules": 1, "status": "finished"})
                return self.chunk("")
            if STATE["model"]:  # simplification: the old model's jobs are cancelled, not awaited
                STATE.update(model=None, params={}, epoch=STATE["epoch"] + 1)
            log(f"INFO:     Loading model: {(model_dir() / name).resolve()}")
            modules, step = 4, float(opt("load_delay")) / 4
            for i in range(1, modules):
                self.wait(step, watch=False)
                self.event({"model_type": "model", "module": i, "modules": modules, "status": "processing"})
            self.wait(step, watch=False)
            if name in (opt("load_fail_models") or []):
                message = f"stand-in: simulated failure while loading {name}"
                log(f"ERROR:    {message}", err=True)
                self.event({"error": {"message": message, "trace": None}})
                return self.chunk("")
            STATE.update(model=name, params=model_params(name, body))
            log("INFO:     Model successfully loaded.")
            self.event({"model_type": "model", "module": modules, "modules": modules, "status": "finished"})
            self.chunk("")

    def r_generate(self, raw, path):
        chat = path == "/v1/chat/completions"
        body = self.parse_body(raw)
        if body is None:
            return
        if ("messages" if chat else "prompt") not in body:
            return self.send_json(422, invalid("missing", ["messages" if chat else "prompt"], "Field required", body))
        model = STATE["model"]
        if model is None:  # quirk: `model` set while nothing is loaded is an unhandled 500
            if body.get("model"):
                return self.send_json(500, b"Internal Server Error", "text/plain; charset=utf-8")
            return self.send_json(503, NOT_LOADED)
        count, finish = int(opt("tokens")), "stop"
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < count:
            count, finish = limit, "length"
        tokens = [str(opt("reply")) * (i == 0) + f"tok{i} " for i in range(count)]
        options = body.get("stream_options")
        job = {"chat": chat, "model": model, "body": body, "tokens": tokens, "finish": finish,
               "usage": isinstance(options, dict) and options.get("include_usage") is True,
               "id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(16), "started": time.monotonic()}
        if body.get("stream") is True:
            return self.stream(job)
        crash, fail = opt("crash_after_tokens"), opt("stream_error_after")
        time.sleep(float(opt("prefill_delay")) + float(opt("token_delay")) * count)
        if crash is not None and int(crash) <= count:
            log("ERROR:    stand-in: simulated crash", err=True)
            os._exit(1)
        if fail is not None and int(fail) <= count:
            return self.send_json(503, {"detail": f"Completion {job['id']} aborted. Maybe the model was "
                                                  "unloaded? Please check the server console."})
        text = "".join(tokens)
        if chat:
            choice = {"index": 0, "finish_reason": finish, "eos_reason": EOS[finish], "stop_str": None,
                      "message": {"role": "assistant", "content": text or None, "reasoning_content": None,
                                  "tool_calls": None}, "logprobs": None}
        else:
            choice = {"index": 0, "finish_reason": finish, "text": text, "logprobs": None}
        reply = {"id": job["id"], "object": "chat.completion" if chat else "text_completion",
                 "created": int(time.time()), "model": model, "choices": [choice], "echo": body}
        if job["usage"]:
            reply["usage"] = self.usage(job)
        self.send_json(200, reply)

    @staticmethod
    def usage(job):
        prompt = max(1, len(json.dumps(job["body"].get("messages") or job["body"].get("prompt") or "").split()))
        n, elapsed = len(job["tokens"]), max(time.monotonic() - job["started"], 0.002)
        prompt_time, completion_time = round(elapsed / 4, 6), round(elapsed * 3 / 4, 6)
        return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n,
                "prompt_time": prompt_time, "prompt_tokens_per_sec": round(prompt / prompt_time, 2),
                "completion_time": completion_time, "completion_tokens_per_sec": round(n / completion_time, 2),
                "total_time": round(elapsed, 6)}

    def stream(self, job):
        chat, tokens, epoch = job["chat"], job["tokens"], STATE["epoch"]
        base = {"id": job["id"], "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), ("model" if chat else "model_name"): job["model"]}
        crash, fail = opt("crash_after_tokens"), opt("stream_error_after")
        echo = {"echo": job["body"]}
        self.sse_start()
        if not self.wait(opt("prefill_delay")):
            return log(f"INFO:     Generation {job['id']} cancelled by user.")
        for i in range(len(tokens) + 1):  # i = chunks sent so far
            if crash is not None and i >= int(crash):
                log("ERROR:    stand-in: simulated crash mid-stream", err=True)
                os._exit(1)
            if (fail is not None and i >= int(fail)) or STATE["epoch"] != epoch:  # failure or unloaded
                message = f"{'Chat completion' if chat else 'Completion'} {job['id']} aborted. " \
                          "Please check the server console."
                log(f"ERROR:    {message}", err=True)
                self.event({"error": {"message": message, "trace": None}, **echo})
                return self.chunk("")
            if i == len(tokens):
                break
            choice = {"index": 0, "delta": {"content": tokens[i]}} if chat else {"index": 0, "text": tokens[i]}
            self.event({**base, "choices": [{**choice, "finish_reason": None}], **echo})
            echo = {}
            if i + 1 < len(tokens) and not self.wait(opt("token_delay")):
                return log(f"INFO:     Generation {job['id']} cancelled by user.")
        final = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
        final["finish_reason"] = job["finish"]
        if job["usage"]:
            self.event({**base, "choices": [final], "usage": self.usage(job), **echo})
        else:
            self.event({**base, "choices": [{**final, "eos_reason": EOS[job["finish"]]}], **echo})
        self.event("[DONE]")
        self.chunk("")


def load_startup_model(name):
    """Load model.model_name before the port is bound; exit 1 on failure, as TabbyAPI's crash does."""
    path, failure, message = model_dir() / name, opt("exit_during_load"), None
    if not path.is_dir():
        message = f"FileNotFoundError: Could not find the model path {path.resolve()}. Check model name?"
    elif failure:
        time.sleep(float(opt("load_delay")) / 2)
        message = "RuntimeError: " + (failure if isinstance(failure, str) else f"stand-in: failed loading {name}")
    if message:
        log(f'Traceback (most recent call last):\n  File "main.py", line 1, in <module>\n{message}', err=True)
        sys.exit(1)
    log(f"INFO:     Loading model: {path.resolve()}")
    while opt("hang_during_load"):
        time.sleep(1)
    time.sleep(float(opt("load_delay")))
    STATE.update(model=name, params=model_params(name, CFG["model"]))
    log("INFO:     Model successfully loaded.")


def main(argv=None):
    global CFG
    parser = argparse.ArgumentParser(prog="main.py")
    parser.add_argument("--config")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    CFG = deep_merge(DEFAULTS, read_yaml("config.yml") if os.path.isfile("config.yml") else {})
    if args.config:
        CFG = deep_merge(CFG, read_yaml(args.config))

    def on_signal(signum, frame):
        try:
            log(f"INFO:     Received {signal.Signals(signum).name}, shutting down.")
            sys.stderr.flush()
        except (OSError, RuntimeError):  # a reentrant print must not block the exit
            pass
        os._exit(0)  # prompt, even with streams open

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if opt("ignore_sigterm") else on_signal)
    host, port = CFG["network"].get("host") or "127.0.0.1", int(CFG["network"].get("port") or 5000)
    if port_in_use(port):
        if port_in_use(port + 1):
            log(f"ERROR:    Ports {port} and {port + 1} are in use by other processes. Please free up those "
                "ports or specify a different one.\nERROR:    Exiting...")
            return 0
        log(f"WARNING:  Port {port} is currently in use. Switching to {port + 1}.")
        port += 1
    if CFG["model"].get("model_name"):
        load_startup_model(str(CFG["model"]["model_name"]))
    if not os.path.isfile("api_tokens.yml"):
        with open("api_tokens.yml", "w", encoding="utf-8") as f:
            yaml.safe_dump({"api_key": secrets.token_hex(16), "admin_key": secrets.token_hex(16)}, f)
        log("INFO:     Created api_tokens.yml with new API and admin keys.")
    key_level(None)  # read the tokens now
    try:
        server = Server((host, port), Handler)
    except OSError as exc:
        log(f"ERROR:    [Errno {exc.errno}] error while attempting to bind on ({host!r}, {port})", err=True)
        return 1
    log(f"INFO:     Uvicorn running on http://{host}:{port} (Press CTRL+C to quit)")
    server.serve_forever()
    return 0


def make_tabby_dir(path: "str | os.PathLike[str]", models: "tuple[str, ...] | list[str]" = ("m1",),
                   config: "dict | None" = None, tokens: "dict | None" = None) -> Path:
    """Create a TabbyAPI folder at path and return it: main.py running this stand-in, models/<name>/config.json
    for each name, config.yml from config (a dict) and api_tokens.yml from tokens ({api_key, admin_key})."""
    root, me = Path(path), str(Path(__file__).resolve())
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "main.py").write_text(f"import runpy, sys\nsys.argv[0] = {me!r}\n"
                                  f"runpy.run_path({me!r}, run_name='__main__')\n")
    for name in models:
        (root / "models" / name).mkdir(parents=True, exist_ok=True)
        (root / "models" / name / "config.json").write_text(
            json.dumps({"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096}))
    if config is not None:
        (root / "config.yml").write_text(yaml.safe_dump(config))
    if tokens is not None:
        (root / "api_tokens.yml").write_text(yaml.safe_dump(tokens))
    return root


if __name__ == "__main__":
    sys.exit(main())
