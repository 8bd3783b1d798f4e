"""create_app(): the Flask app with its blueprints, error handlers and the access log.

Builds nothing slow and reads no files at import; the manager is passed in or built here.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Flask, Response, jsonify, request
from flask.json.provider import DefaultJSONProvider
from flask_cors import CORS
from werkzeug.exceptions import HTTPException

from proxy.app_context import ProxyContext
from proxy.auth import Keys, load_keys
from proxy.config import Config
from proxy.errors import (
    BadRequest,
    ProxyError,
    UpstreamError,
    render_anthropic_error,
    render_ollama_error,
    render_openai_error,
)
from proxy.launcher import ProcessLauncher
from proxy.manager import ModelManager
from proxy.observe import RequestRecord
from proxy.request_log import RequestLog
from proxy.metrics import Metrics
from proxy.routes import admin, anthropic, llamacpp, metrics, ollama, openai, passthrough, responses, ui, usage
from proxy.upstream import Upstream

access_log = logging.getLogger("proxy.access")
body_log = logging.getLogger("proxy.bodies")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
MAX_JSON_DEPTH = 100  # far beyond any real request (a JSON schema is a few levels); a backend may recurse on it


def create_app(config: Config, manager: ModelManager | None = None, keys: Keys | None = None,
               upstream: Upstream | None = None, request_log: RequestLog | None = None) -> Flask:
    """Return the proxy's Flask app; the caller owns manager.shutdown().

    Each dependency may be passed in (tests give an in-memory manager or an upstream of their own);
    what is not passed is built from the config.
    """
    app = Flask("proxy", static_folder=None)  # the dashboard serves its own files, under /ui/static
    app.json = StrictJSON(app)
    manager = manager or ModelManager(config, ProcessLauncher(config))
    keys = keys or load_keys(config.proxy.api_tokens_path, disabled=config.proxy.disable_auth)
    upstream = upstream or Upstream(
        connect_timeout_s=config.proxy.connect_timeout_s,
        read_timeout_s=config.proxy.read_timeout_s,
        pool_size=config.proxy.threads,
        max_answer_bytes=int(config.proxy.max_answer_mb * 1024 * 1024),
    )
    context = ProxyContext(manager, upstream, keys, time.time())
    app.extensions["proxy"] = context
    context.request_log = request_log  # the caller opens and closes it (proxy.py); None: not kept
    context.metrics = Metrics(manager, context.admission.in_progress,
                              dropped_rows=None if request_log is None else (lambda: request_log.dropped))
    context.observers.add(context.metrics)
    if request_log is not None:
        context.observers.add(request_log)
    manager.listen(context.observers.model_event)
    app.config["MAX_CONTENT_LENGTH"] = int(config.proxy.max_body_mb * 1024 * 1024)  # 413 beyond it
    if config.proxy.cors_origins:  # off by default: browsers may call the API only from these origins
        CORS(app, origins=list(config.proxy.cors_origins), allow_headers=["Authorization", "Content-Type",
             "x-api-key", "anthropic-version", "anthropic-beta"], expose_headers=["Retry-After"], max_age=600)
    app.before_request(note_route)
    app.before_request(parse_json_body)
    if config.proxy.log_bodies:  # opt-in: bodies hold prompts
        app.before_request(log_body)
    app.register_blueprint(openai.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(ollama.bp)
    app.register_blueprint(anthropic.bp)
    app.register_blueprint(llamacpp.bp)
    app.register_blueprint(passthrough.bp)
    app.register_blueprint(responses.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(ui.bp)
    app.register_blueprint(usage.bp)

    @app.errorhandler(ProxyError)
    def proxy_error(error: ProxyError) -> Response:
        return render_openai_error(error)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        # Unknown routes, wrong methods, and the 500 Flask makes of an unexpected exception.
        status = error.code or 500
        if request.path.startswith("/api/"):  # Ollama's shape for Ollama's paths
            return render_ollama_error(UpstreamError(status, f"{error.name}: {error.description}"))
        if request.path.startswith("/v1/messages"):  # Anthropic's shape for Anthropic's paths
            return render_anthropic_error(UpstreamError(status, f"{error.name}: {error.description}"))
        response = jsonify({"error": {
            "message": f"{error.name}: {error.description}",
            "type": "invalid_request_error" if status < 500 else "server_error",
            "code": (error.name or "error").lower().replace(" ", "_"),
            "param": None,
        }})
        response.status_code = status
        return response

    app.wsgi_app = AccessLog(app.wsgi_app, app.extensions["proxy"])  # type: ignore[method-assign]  # the documented way to wrap
    return app


def parse_json_body() -> None:
    """Parse a request's JSON body once, strictly, before its route reads it (the result is cached).

    Nesting too deep and NaN/Infinity become a 400 in the route's own error shape, whichever
    dialect reads the body; a body that is not JSON at all is left to the route to report.
    """
    if request.content_length and request.method in ("POST", "PUT", "PATCH"):
        # Counted before it is read; the access log releases it when the answer ends.
        request.environ["proxy.body"] = ProxyContext.current().bodies.hold(request.content_length)
        if request.mimetype != "multipart/form-data":  # an upload is read by its route, never held whole
            request.get_json(force=True, silent=True)


class StrictJSON(DefaultJSONProvider):
    """Flask's JSON, refusing what is not JSON (NaN, Infinity: RFC 8259) or nests beyond MAX_JSON_DEPTH.

    Python's json accepts both, and a deep body ends in RecursionError somewhere later (a 500).
    """

    sort_keys = False  # answers keep the backend's (and OpenAI's) field order

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            value = json.loads(s, parse_constant=_refuse_constant)
        except RecursionError:
            raise BadRequest(f"the JSON body nests too deeply (at most {MAX_JSON_DEPTH} levels)") from None
        text = s.encode() if isinstance(s, str) else s
        if text.count(b"[") + text.count(b"{") > MAX_JSON_DEPTH and _nests_deeper(value, MAX_JSON_DEPTH):
            raise BadRequest(f"the JSON body nests too deeply (at most {MAX_JSON_DEPTH} levels)")
        return value


def _refuse_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not valid JSON (RFC 8259 has no NaN or Infinity); send a number or null")


def _nests_deeper(value: Any, limit: int) -> bool:
    """Say whether arrays and objects nest deeper than limit; level by level, so nothing recurses."""
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > limit:
            return True
        children: list[Any] = []
        for item in level:
            members = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
            children.extend(member for member in members if isinstance(member, dict | list))
        level = children
    return False


def log_body() -> None:
    if request.method == "POST":
        body_log.debug("%s %s body: %s", request.method, request.path, request.get_data(cache=True)[:4000])


class AccessLog:
    """WSGI middleware writing one line per request when its body is finished (streams included), and
    reporting it to the operator's view (a RequestRecord to the Observers) unless it is a probe."""

    def __init__(self, wrapped: WSGIApp, context: ProxyContext) -> None:
        self._wrapped = wrapped
        self._context = context

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        arrived, started = time.time(), time.monotonic()
        status: list[str] = []
        streamed: list[bool] = []

        def record_status(status_line: str, headers: Any, exc_info: Any = None) -> Any:
            status.append(status_line.split(" ", 1)[0])
            kind = next((value for name, value in headers if name.lower() == "content-type"), "")
            streamed.append(kind.startswith(("text/event-stream", "application/x-ndjson")))
            return start_response(status_line, headers, exc_info)

        def done(body: _Counted) -> None:
            elapsed = time.monotonic() - started
            access_log.info("%s %s %s model=%s key=%s %.3fs %dB", environ.get("REQUEST_METHOD"),
                            environ.get("PATH_INFO"), status[0] if status else "-", environ.get("proxy.model", "-"),
                            environ.get("proxy.key", "-"), elapsed, body.sent)
            if environ.get("proxy.route") is not None:  # None: a probe, a scrape, the dashboard's own traffic
                self._context.observers.request_done(request_record(
                    environ, arrived, elapsed, int(status[0]) if status and status[0].isdigit() else 0,
                    bool(streamed and streamed[0]), body))

        try:
            body = self._wrapped(environ, record_status)
        except BaseException:
            release_slot(environ)
            raise
        return _Counted(body, lambda: release_slot(environ), done)


def note_route() -> None:
    """Note the route and dialect of a request the operator's view records (probes and scrapes are not)."""
    if request.url_rule is None or request.blueprint in UNRECORDED_BLUEPRINTS or request.path in UNRECORDED_PATHS:
        return
    request.environ["proxy.route"] = request.url_rule.rule
    request.environ["proxy.dialect"] = DIALECTS.get(request.blueprint or "", "other")


UNRECORDED_PATHS = frozenset({"/health", "/ping", "/status", "/", "/api/version"})
UNRECORDED_BLUEPRINTS = frozenset({"metrics", "ui"})
DIALECTS = {"openai": "openai", "passthrough": "openai", "ollama": "ollama", "anthropic": "anthropic",
            "responses": "responses", "llamacpp": "llamacpp", "admin": "admin", "usage": "admin"}
_USAGE = {  # in an answer's end: OpenAI's usage, Ollama's counts, Anthropic's and Responses' usage; then
    # llama.cpp's timings, which streams carry without usage (prompt_n leaves out the cached prompt)
    "prompt": (re.compile(rb'"(?:prompt_tokens|prompt_eval_count|input_tokens)"\s*:\s*(\d+)'),
               re.compile(rb'"prompt_n"\s*:\s*(\d+)')),
    "completion": (re.compile(rb'"(?:completion_tokens|eval_count|output_tokens)"\s*:\s*(\d+)'),
                   re.compile(rb'"predicted_n"\s*:\s*(\d+)')),
}
USAGE_TAIL = 16384  # bytes of an answer's end searched for its usage


def request_record(environ: dict[str, Any], arrived: float, elapsed: float, status: int, stream: bool,
                   body: _Counted) -> RequestRecord:
    """Return the operator's record of a finished request from what the request noted in its environ."""
    lease = environ.get("proxy.lease")
    ttft = None
    first_at = environ.get("proxy.first_byte_at", body.first_at)  # a stream with load progress notes its own
    if lease is not None and stream and first_at is not None:
        ttft = max(0.0, first_at - lease.granted_at)
    usage = _usage(body.tail()) if lease is not None else {}
    length = environ.get("CONTENT_LENGTH") or "0"
    return RequestRecord(
        time=arrived, key=environ.get("proxy.key"), client=environ.get("REMOTE_ADDR") or "-",
        route=environ["proxy.route"], dialect=environ.get("proxy.dialect", "other"), model=environ.get("proxy.model"),
        status=status, error=environ.get("proxy.error"),
        waited_s=None if lease is None else lease.waited_s, ttft_s=ttft, duration_s=elapsed,
        prompt_tokens=usage.get("prompt"), completion_tokens=usage.get("completion"),
        bytes_in=int(length) if length.isdigit() else 0, bytes_out=body.sent, stream=stream,
        loaded=bool(lease is not None and lease.loaded))


def release_slot(environ: dict[str, Any]) -> None:
    """Release the request's admission slot (see ProxyContext.authorize) and its body's share of the
    body budget (parse_json_body), if it took them."""
    for held in (environ.pop("proxy.slot", None), environ.pop("proxy.body", None)):
        if held is not None:
            held.release()


def _usage(tail: bytes) -> dict[str, int]:
    """Return the token counts an answer's end reports (the last of each), by kind: prompt, completion."""
    found = {}
    for kind, patterns in _USAGE.items():
        for pattern in patterns:
            figures = pattern.findall(tail)
            if figures:
                found[kind] = int(figures[-1])
                break
    return found


class _Counted:
    """The answer's body as it leaves: counts its bytes, notes when the first one left, keeps its end."""

    def __init__(self, body: Iterable[bytes], release: Callable[[], None], done: Callable[[_Counted], None]) -> None:
        self._body = body
        self._release = release
        self._done = done
        self.sent = 0
        self.first_at: float | None = None
        self._last = b""     # the last two chunks: an answer's usage is in its end
        self._before = b""

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            if chunk:
                if self.first_at is None:
                    self.first_at = time.monotonic()
                self.sent += len(chunk)
                self._before, self._last = self._last, chunk
            yield chunk

    def tail(self) -> bytes:
        """Return the end of the answer (at most USAGE_TAIL bytes)."""
        return (self._before + self._last)[-USAGE_TAIL:]

    def close(self) -> None:
        self._release()  # first: when the close below releases a lease, this slot is already free
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._done(self)
