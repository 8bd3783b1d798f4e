"""OpenAI routes (/v1/*): validate, then the exchange (lease, forward, relay). The only translation
is the model's name (dialects/openai.py); no processes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, jsonify

from proxy import exchange
from proxy.app_context import ProxyContext
from proxy.config import ModelConfig
from proxy.dialects.openai import model_field_replacements, renamed, renames_model
from proxy.errors import ProxyError, render_openai_error, sse_error_event
from proxy.exchange import Opened, json_body
from proxy.pipeline import Prepared, prepare, resolve_model
from proxy.progress import comment_frame, reasoning_frame
from proxy.streaming import Replacer

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
    """Return a profile's card; a peer's model shows the peer's own state and kind, and names the peer
    (`peer`: proxies that peer with each other skip such cards, so no request goes round in circles)."""
    state = context.listed_state(model, state)
    remote = model.remote
    backend = remote.serves if remote is not None and remote.peer is not None and remote.serves else model.backend
    card = {"id": model.name, "object": "model", "created": int(context.started_at), "owned_by": "proxy",
            "aliases": list(model.aliases), "backend": backend, "state": state, "loaded": state == "ready"}
    if remote is not None and remote.peer is not None:
        card["peer"] = remote.peer
    if model.description:
        card["description"] = model.description
    return card


def forward(kind: str, path: str) -> Response:
    context = ProxyContext.current()
    prepared = prepare(context.config, json_body(), kind)
    mode = prepared.model.load_progress
    if prepared.stream and mode != "off" and not context.manager.is_ready(prepared.model.name):
        model = prepared.model
        frame: Callable[[str], bytes] = comment_frame
        if mode == "reasoning" and kind == "chat":
            frame = functools.partial(reasoning_frame, model=model.name)
        renamer = Replacer(model_field_replacements(model)) if renames_model(model) else None
        return exchange.run_with_progress(prepared, path, lambda opened: answer(opened, prepared), renamer, frame,
                                          STREAM_HEADERS)
    return exchange.run(prepared, path, lambda opened: answer(opened, prepared))


def answer(opened: Opened, prepared: Prepared) -> Response:
    """Answer with the backend's answer: a stream relayed, a small answer read whole, a large one passed on."""
    model = prepared.model
    renamer = Replacer(model_field_replacements(model)) if renames_model(model) else None
    if prepared.stream and opened.status == 200 and opened.is_sse:
        return exchange.relay_answer(opened, renamer, sse_error_event, content_type=opened.content_type,
                                     headers=STREAM_HEADERS)
    if opened.status != 200 or (opened.declared_length is not None and opened.declared_length <= WHOLE_BODY_MAX):
        body = opened.read()
        if opened.status == 200 and renamer is not None:
            body = renamed(body, model.name)
        return Response(body, status=opened.status, content_type=opened.content_type)
    # A large or unsized answer (a big embedding batch) passes through as it arrives instead of being
    # held whole; the model id is renamed in the bytes, as in streams.
    return exchange.relay_answer(opened, renamer, abort_body, content_type=opened.content_type)


def abort_body(error: ProxyError) -> bytes:
    """End a plain (non-SSE) answer that broke off: the connection closes without the last chunk,
    so the client sees a truncated body rather than a complete one that is wrong."""
    raise error
