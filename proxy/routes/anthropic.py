"""Anthropic Messages routes (/v1/messages, /v1/messages/count_tokens): HTTP glue around the Anthropic
dialect and the exchange. The mapping and the event stream live in dialects/anthropic.py.

Headers such as anthropic-version and anthropic-beta, and query strings such as ?beta=true, are
accepted and change nothing: the backend answers what it can.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from flask import Blueprint, Response, jsonify

from proxy import exchange
from proxy.app_context import ProxyContext
from proxy.catalog import context_length
from proxy.config import ModelConfig
from proxy.dialects.anthropic import AnthropicEvents, estimated_tokens, openai_chat_from_anthropic, prompt_text
from proxy.dialects.backend import chunk_from_response
from proxy.dialects.samplers import sampler_names
from proxy.errors import BadRequest, ProxyError, UpstreamError, anthropic_error_event, render_anthropic_error
from proxy.exchange import Opened, json_body
from proxy.pipeline import Prepared, finish, pop_keep_alive, require_object, resolve_model

log = logging.getLogger(__name__)

bp = Blueprint("anthropic", __name__)

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# The tokenizer route of each backend kind that has one; a command backend gets the estimate.
TOKENIZERS = {"llamacpp": "/tokenize", "tabbyapi": "/v1/token/encode"}


@bp.before_request
def require_key() -> None:
    ProxyContext.current().authorize()


@bp.errorhandler(ProxyError)
def render_error(error: ProxyError) -> Response:
    return render_anthropic_error(error)


@bp.post("/v1/messages")
def messages() -> Response:
    body, model = read_body()
    keep_alive_s = pop_keep_alive(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream: expected true or false, got {stream!r}", param="stream")
    request = openai_chat_from_anthropic(body, sampler_names(model.sampler_kind), context_length(model))
    events = AnthropicEvents(message_id=f"msg_{uuid.uuid4().hex[:24]}", model=str(body.get("model") or model.name),
                             model_name=model.name, input_tokens=estimated_tokens(request), gather=not stream)
    request["stream"] = True  # one code path: a non-stream answer is gathered from the stream
    request["stream_options"] = {"include_usage": True}
    prepared = finish(model, request, "chat", keep_alive_s, True)
    return exchange.run(prepared, "/v1/chat/completions", lambda opened: answer(opened, events, stream))


def answer(opened: Opened, events: AnthropicEvents, stream: bool) -> Response:
    """Answer with Anthropic's events as the backend's tokens come, or with the gathered Message."""
    opened.check_status()
    if opened.is_sse and stream:
        return exchange.relay_answer(opened, events, anthropic_error_event, content_type="text/event-stream",
                                     headers=STREAM_HEADERS)
    if opened.is_sse:
        exchange.gather(opened, events)
        return jsonify(events.message())
    try:  # a backend that ignored "stream": its whole answer is one chunk
        whole = json.loads(opened.read())
    except ValueError as exc:
        raise UpstreamError(502, f"{opened.lease.model_name}: the backend's answer is not JSON") from exc
    produced = events.feed_chunk(chunk_from_response(whole)) + events.flush()
    if stream:
        return Response(produced, content_type="text/event-stream", headers=STREAM_HEADERS)
    return jsonify(events.message())


@bp.post("/v1/messages/count_tokens")
def count_tokens() -> Response:
    """Count with the backend's tokenizer when the model is loaded; otherwise the estimate, which
    loads nothing (see estimated_tokens)."""
    body, model = read_body()
    request = openai_chat_from_anthropic(body, sampler_names(model.sampler_kind), counting=True)
    counted = tokenizer_count(model, prompt_text(request)) if is_ready(model) else None
    return jsonify({"input_tokens": counted if counted is not None else estimated_tokens(request)})


def read_body() -> tuple[dict[str, Any], ModelConfig]:
    body = dict(require_object(json_body()))
    return body, resolve_model(ProxyContext.current().config, body.get("model"))


def is_ready(model: ModelConfig) -> bool:
    """Say whether the model is loaded now (a snapshot: at worst a model unloaded since is started again)."""
    return any(status.name == model.name and status.state == "ready"
               for status in ProxyContext.current().manager.snapshot())


def tokenizer_count(model: ModelConfig, text: str) -> int | None:
    """Return the backend's token count for text, or None when it has no tokenizer or it fails."""
    path = TOKENIZERS.get(model.backend)
    if path is None:
        return None
    body = {"content": text, "add_special": True} if model.backend == "llamacpp" else {"text": text}
    prepared = Prepared(model=model, body=body, keep_alive_s=None, stream=False)

    def read_count(opened: Opened) -> int | None:
        if opened.status != 200:
            opened.close()
            return None
        try:
            tokens = json.loads(opened.read()).get("tokens")
        except (ValueError, AttributeError):
            return None
        return len(tokens) if isinstance(tokens, list) else None

    try:
        return exchange.run(prepared, path, read_count)
    except ProxyError as exc:  # busy or gone: the estimate answers
        log.info("model %s: no token count from the backend (%s); estimating", model.name, exc.message)
        return None
