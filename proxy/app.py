"""create_app(): the Flask app with its blueprints, error handlers and the access log.

Builds nothing slow and reads no files at import; the manager is passed in or built here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Flask, Response, jsonify, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException

from proxy.app_context import ProxyContext
from proxy.auth import Keys, load_keys
from proxy.config import Config
from proxy.errors import ProxyError, UpstreamError, render_ollama_error, render_openai_error
from proxy.manager import ModelManager, ProcessLauncher
from proxy.routes import admin, ollama, openai
from proxy.upstream import Upstream

access_log = logging.getLogger("proxy.access")
body_log = logging.getLogger("proxy.bodies")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def create_app(config: Config, manager: ModelManager | None = None, keys: Keys | None = None) -> Flask:
    """Return the proxy's Flask app; the caller owns manager.shutdown()."""
    app = Flask("proxy")
    app.json.sort_keys = False  # type: ignore[attr-defined]  # DefaultJSONProvider has it
    manager = manager or ModelManager(config, ProcessLauncher(config))
    keys = keys or load_keys(config.proxy.api_tokens_path, disabled=config.proxy.disable_auth)
    upstream = Upstream(
        connect_timeout_s=config.proxy.connect_timeout_s,
        read_timeout_s=config.proxy.read_timeout_s,
        pool_size=config.proxy.threads,
        max_answer_bytes=int(config.proxy.max_answer_mb * 1024 * 1024),
    )
    app.extensions["proxy"] = ProxyContext(manager, upstream, keys, time.time())
    app.config["MAX_CONTENT_LENGTH"] = int(config.proxy.max_body_mb * 1024 * 1024)  # 413 beyond it
    if config.proxy.cors_origins:  # off by default: browsers may call the API only from these origins
        CORS(app, origins=list(config.proxy.cors_origins), allow_headers=["Authorization", "Content-Type",
             "x-api-key"], expose_headers=["Retry-After"], max_age=600)
    if config.proxy.log_bodies:  # opt-in: bodies hold prompts
        app.before_request(log_body)
    app.register_blueprint(openai.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(ollama.bp)

    @app.errorhandler(ProxyError)
    def proxy_error(error: ProxyError) -> Response:
        return render_openai_error(error)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        # Unknown routes, wrong methods, and the 500 Flask makes of an unexpected exception.
        status = error.code or 500
        if request.path.startswith("/api/"):  # Ollama's shape for Ollama's paths
            return render_ollama_error(UpstreamError(status, f"{error.name}: {error.description}"))
        response = jsonify({"error": {
            "message": f"{error.name}: {error.description}",
            "type": "invalid_request_error" if status < 500 else "server_error",
            "code": (error.name or "error").lower().replace(" ", "_"),
            "param": None,
        }})
        response.status_code = status
        return response

    app.wsgi_app = AccessLog(app.wsgi_app)  # type: ignore[method-assign]  # the documented way to wrap
    return app


def log_body() -> None:
    if request.method == "POST":
        body_log.debug("%s %s body: %s", request.method, request.path, request.get_data(cache=True)[:4000])


class AccessLog:
    """WSGI middleware writing one line per request when its body is finished (streams included)."""

    def __init__(self, wrapped: WSGIApp) -> None:
        self._wrapped = wrapped

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.monotonic()
        status: list[str] = []

        def record_status(status_line: str, headers: Any, exc_info: Any = None) -> Any:
            status.append(status_line.split(" ", 1)[0])
            return start_response(status_line, headers, exc_info)

        try:
            body = self._wrapped(environ, record_status)
        except BaseException:
            release_slot(environ)
            raise
        return _Counted(body, lambda: release_slot(environ), lambda sent: access_log.info(
            "%s %s %s model=%s key=%s %.3fs %dB", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"),
            status[0] if status else "-", environ.get("proxy.model", "-"), environ.get("proxy.key", "-"),
            time.monotonic() - started, sent))


def release_slot(environ: dict[str, Any]) -> None:
    """Release the request's admission slot (see ProxyContext.authorize), if it took one."""
    slot = environ.pop("proxy.slot", None)
    if slot is not None:
        slot.release()


class _Counted:
    def __init__(self, body: Iterable[bytes], release: Callable[[], None], done: Callable[[int], None]) -> None:
        self._body = body
        self._release = release
        self._done = done
        self._sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            self._sent += len(chunk)
            yield chunk

    def close(self) -> None:
        self._release()  # first: when the close below releases a lease, this slot is already free
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._done(self._sent)
