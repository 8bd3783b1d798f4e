"""OpenAI routes (/v1/*): validate, lease, forward, relay. No dialect translation, no processes."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, jsonify, request

from proxy.app_context import ProxyContext
from proxy.config import ModelConfig
from proxy.errors import ProxyError, render_openai_error, sse_error_event
from proxy.manager import Cancelled
from proxy.pipeline import Prepared, open_upstream, prepare, resolve_model
from proxy.streaming import relay, replacing

bp = Blueprint("openai", __name__)

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
WHOLE_BODY_MAX = 1024 * 1024  # a non-stream answer up to this size is read whole (renamed as JSON, sized)


@bp.before_request
def require_key() -> None:
    ProxyContext.current().authorize()


@bp.errorhandler(ProxyError)
def render_error(error: ProxyError) -> Response:
    return render_openai_error(error)


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    return forward("chat", "/v1/chat/completions")


@bp.post("/v1/completions")
def completions() -> Response:
    return forward("completion", "/v1/completions")


@bp.post("/v1/embeddings")
def embeddings() -> Response:
    return forward("embedding", "/v1/embeddings")


@bp.get("/v1/models")
def list_models() -> Response:
    context = ProxyContext.current()
    config = context.config
    cards = [model_card(context, config.models[entry.name], entry.state)
             for entry in context.manager.snapshot() if entry.name in config.models]
    return jsonify({"object": "list", "data": cards})


@bp.get("/v1/models/<path:name>")
def get_model(name: str) -> Response:
    context = ProxyContext.current()
    model = resolve_model(context.config, name)
    state = next((entry.state for entry in context.manager.snapshot() if entry.name == model.name), "stopped")
    return jsonify(model_card(context, model, state))


def model_card(context: ProxyContext, model: ModelConfig, state: str) -> dict[str, Any]:
    card = {"id": model.name, "object": "model", "created": int(context.started_at), "owned_by": "proxy",
            "aliases": list(model.aliases), "backend": model.backend, "state": state, "loaded": state == "ready"}
    if model.description:
        card["description"] = model.description
    return card


def forward(kind: str, path: str) -> Response:
    context = ProxyContext.current()
    prepared = prepare(context.config, request.get_json(force=True, silent=True), kind)
    request.environ["proxy.model"] = prepared.model.name
    # waitress says whether the client is still there (proxy.py sets channel_request_lookahead)
    cancelled = request.environ.get("waitress.client_disconnected")
    with context.upstream.watching(cancelled):  # a client that leaves while we wait cuts the backend request
        return answer(context, prepared, path, cancelled)


def answer(context: ProxyContext, prepared: Prepared, path: str, cancelled: Cancelled | None) -> Response:
    """Send the prepared request and answer with the backend's: relayed, passed through or read whole."""
    lease, upstream_response = open_upstream(context.manager, context.upstream, prepared, path, cancelled)
    content_type = upstream_response.headers.get("Content-Type", "application/json")
    if prepared.stream and upstream_response.status_code == 200 and content_type.startswith("text/event-stream"):
        chunks = context.upstream.iter_body(lease, upstream_response)
        if renames_model(prepared.model):
            chunks = replacing(chunks, model_field_replacements(prepared.model))
        return Response(relay(chunks, upstream_response.close, lease, sse_error_event),
                        status=200, content_type=content_type, headers=STREAM_HEADERS)
    declared = upstream_response.headers.get("Content-Length", "")
    if upstream_response.status_code != 200 or (declared.isdigit() and int(declared) <= WHOLE_BODY_MAX):
        try:
            body = context.upstream.read(lease, upstream_response)
        finally:
            lease.release()
        if upstream_response.status_code == 200 and renames_model(prepared.model):
            body = renamed(body, prepared.model.name)
        return Response(body, status=upstream_response.status_code, content_type=content_type)
    # A large or unsized answer (a big embedding batch) passes through as it arrives instead of being
    # held whole; the model id is renamed in the bytes, as in streams.
    chunks = context.upstream.iter_body(lease, upstream_response)
    if renames_model(prepared.model):
        chunks = replacing(chunks, model_field_replacements(prepared.model))
    return Response(relay(chunks, upstream_response.close, lease, abort_body), status=200, content_type=content_type)


def abort_body(error: ProxyError) -> bytes:
    """End a plain (non-SSE) answer that broke off: the connection closes without the last chunk,
    so the client sees a truncated body rather than a complete one that is wrong."""
    raise error


def renames_model(model: ModelConfig) -> bool:
    """Say whether answers need the public name put in: the backend uses another id, or TabbyAPI's
    completion chunks name the model only in `model_name` (clients read `model`)."""
    return model.upstream_model != model.name or model.backend == "tabbyapi"


def model_field_replacements(model: ModelConfig) -> list[tuple[bytes, bytes]]:
    """Return the byte patterns that rename the backend's model id in SSE chunks (compact and spaced JSON).

    TabbyAPI's completion chunks carry `"model_name": <folder>` and no `model`: that field becomes
    both, so every chunk names the model as the client knows it.
    """
    old, new = json.dumps(model.upstream_model).encode(), json.dumps(model.name).encode()
    return [(b'"model":' + old, b'"model":' + new), (b'"model": ' + old, b'"model": ' + new),
            (b'"model_name":' + old, b'"model":' + new + b',"model_name":' + new),
            (b'"model_name": ' + old, b'"model": ' + new + b', "model_name": ' + new)]


def renamed(body: bytes, name: str) -> bytes:
    """Return a JSON answer with `model` (and TabbyAPI's `model_name`) set to the name the client knows."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body
    if isinstance(answer, dict) and ("model" in answer or "model_name" in answer):
        answer["model"] = name
        if "model_name" in answer:
            answer["model_name"] = name
        return json.dumps(answer).encode()
    return body
