"""The one exception tree of the proxy and its renderers (OpenAI, Ollama and Anthropic error shapes).

Views raise these; each blueprint registers the renderer of its own dialect.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Response


class ProxyError(Exception):
    """Base of every error the proxy answers with; carries the HTTP status and an error code."""

    status = 500
    code = "internal_error"
    kind = "server_error"

    def __init__(self, message: str, *, param: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message  # what the client is told
        self.param = param
        # For the log and admins only, never rendered to clients: a backend's output tail, an
        # argv, a path. str(error) includes it, so a logged error shows it.
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.message}; {self.detail}" if self.detail else self.message

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ProxyError):
    status = 400
    code = "invalid_request"
    kind = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    code = "unauthorized"
    kind = "authentication_error"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ProxyError):
    status = 403
    code = "forbidden"
    kind = "permission_error"


class UnknownModel(ProxyError):
    status = 404
    code = "model_not_found"
    kind = "invalid_request_error"


class ClientGone(ProxyError):
    """The client closed its connection while its request waited; nobody reads the answer."""

    status = 499
    code = "client_closed_request"
    kind = "invalid_request_error"


class RetryLater(ProxyError):
    """An error the client should retry after a pause; sets Retry-After."""

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ModelBusy(RetryLater):
    status = 503
    code = "model_busy"
    kind = "server_error"


class RateLimited(RetryLater):
    status = 429
    code = "rate_limited"
    kind = "rate_limit_error"


class ServerBusy(RetryLater):
    """Every request slot is taken: the proxy answers at once instead of queueing in the server."""

    status = 503
    code = "server_busy"
    kind = "server_error"


class UpstreamError(ProxyError):
    """A backend answered with an error status; Ollama routes pass it on in their own shape."""

    kind = "server_error"
    code = "upstream_error"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Unsupported(ProxyError):
    status = 501
    code = "not_supported"
    kind = "invalid_request_error"


class Disabled(ProxyError):
    """A feature the configuration turns off (the request log under `proxy.request_log: off`)."""

    status = 409
    code = "disabled"
    kind = "invalid_request_error"


class Unavailable(RetryLater):
    """A store the proxy reads is down or unreadable (the request log's database); retry later."""

    status = 503
    code = "unavailable"
    kind = "server_error"


class BackendFailed(ProxyError):
    status = 502
    code = "backend_failed"
    kind = "server_error"


class InsufficientMemory(ProxyError):
    """A model cannot fit its devices' budget beside what may not be evicted, or ran out of memory loading."""

    status = 503
    code = "insufficient_memory"
    kind = "server_error"


class BackendTimeout(ProxyError):
    status = 504
    code = "backend_timeout"
    kind = "server_error"


def openai_error_body(error: ProxyError) -> dict[str, Any]:
    """Return the OpenAI error object for an error."""
    return {"error": {"message": error.message, "type": error.kind, "code": error.code, "param": error.param}}


def note_error(error: ProxyError) -> None:
    """Note the error's code in the request's environ, for the access log and the operator's view."""
    from flask import has_request_context, request

    if has_request_context():
        request.environ["proxy.error"] = error.code


def render_openai_error(error: ProxyError) -> "Response":
    """Return a Flask response in OpenAI's error shape, with the error's status and headers."""
    from flask import jsonify  # errors.py stays importable without Flask for pure modules

    response = jsonify(openai_error_body(error))
    response.status_code = error.status
    response.headers.update(error.headers())
    note_error(error)
    return response


def ollama_error_body(error: ProxyError) -> dict[str, Any]:
    """Return the Ollama error object for an error."""
    return {"error": error.message}


def render_ollama_error(error: ProxyError) -> "Response":
    """Return a Flask response in Ollama's error shape, with the error's status and headers."""
    from flask import jsonify

    response = jsonify(ollama_error_body(error))
    response.status_code = error.status
    response.headers.update(error.headers())
    note_error(error)
    return response


def sse_error_event(error: ProxyError) -> bytes:
    """Return an in-band SSE error event, for errors after a stream's status is sent."""
    return b"data: " + json.dumps(openai_error_body(error)).encode() + b"\n\n"


ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                   503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_body(error: ProxyError) -> dict[str, Any]:
    """Return the Anthropic error object for an error: its type follows the status, as Anthropic's do."""
    kind = ANTHROPIC_TYPES.get(error.status) or ("api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def render_anthropic_error(error: ProxyError) -> "Response":
    """Return a Flask response in Anthropic's error shape, with the error's status and headers."""
    from flask import jsonify

    response = jsonify(anthropic_error_body(error))
    response.status_code = error.status
    response.headers.update(error.headers())
    note_error(error)
    return response


def anthropic_error_event(error: ProxyError) -> bytes:
    """Return Anthropic's in-band `error` event, for errors after a stream's status is sent."""
    return b"event: error\ndata: " + json.dumps(anthropic_error_body(error)).encode() + b"\n\n"
