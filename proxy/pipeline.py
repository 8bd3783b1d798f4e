"""Preparing a request, whatever its dialect: resolve the model, read keep_alive, apply the
profile's template, set the backend's id. Pure; the exchange (exchange.py) then sends it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from proxy.catalog import context_length
from proxy.config import Config, ModelConfig
from proxy.durations import parse_keep_alive
from proxy.errors import BadRequest, UnknownModel
from proxy.template import apply_template

MAX_MODEL_NAME = 256
LENGTH_KEYS = ("max_tokens", "max_completion_tokens", "max_length")  # TabbyAPI's names for the answer's length


@dataclass(frozen=True, slots=True)
class Prepared:
    model: ModelConfig
    body: dict[str, Any]       # what the backend receives
    keep_alive_s: float | None
    stream: bool


def require_object(body: Any) -> dict[str, Any]:
    """Return the JSON body if it is an object; raise BadRequest otherwise."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object" if body is not None else
                         "the request body is missing or is not valid JSON")
    return body


def resolve_model(config: Config, requested: Any) -> ModelConfig:
    """Return the profile a request names (or the default profile); 400/404 with the known names."""
    if requested is None or requested == "":
        if config.default_model is None:
            raise BadRequest("model: required (no profile is marked default: true)", param="model")
        return config.models[config.default_model]
    if not isinstance(requested, str):
        raise BadRequest(f"model: expected a string, got {type(requested).__name__}", param="model")
    if len(requested) > MAX_MODEL_NAME or "\x00" in requested:
        raise BadRequest("model: not a valid model name", param="model")
    model = config.resolve_model(requested)
    if model is None:
        known = ", ".join(sorted(config.names)) or "none"
        raise UnknownModel(f"model {requested!r} not found; configured models: {known}", param="model")
    return model


def require_embedding(model: ModelConfig) -> None:
    """Raise BadRequest, naming the profile key that enables them, when the profile is known not to
    serve embeddings; before any lease, so nothing is loaded for a request that cannot succeed.

    Known means: a llama.cpp profile without `llamacpp.embedding: true` (its server then answers
    501 with a flag the user cannot set), or declared `capabilities` without `embedding`. Other
    profiles may embed, so they are never refused here.
    """
    profile = f"{model.source.parent.name}/{model.source.name}"
    if model.llamacpp is not None and not model.llamacpp.embedding:
        raise BadRequest(f'"{model.name}" does not support embeddings: its llama.cpp server runs without them; '
                         f"set llamacpp.embedding: true in {profile} to serve them", param="model")
    if model.capabilities is not None and "embedding" not in model.capabilities:
        raise BadRequest(f'"{model.name}" does not support embeddings: its profile\'s capabilities do not list '
                         f"embedding; add it to capabilities in {profile} if the backend serves them", param="model")


def pop_keep_alive(body: dict[str, Any]) -> float | None:
    """Remove keep_alive (top level, inside options, or LM Studio's ttl) and return it in seconds."""
    value, field = body.pop("keep_alive", None), "keep_alive"
    options = body.get("options")
    if isinstance(options, dict) and "keep_alive" in options:
        options = dict(options)
        nested = options.pop("keep_alive")
        body["options"] = options
        if value is None:
            value, field = nested, "options.keep_alive"
    ttl = body.pop("ttl", None)
    if value is None and ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise BadRequest(f"ttl: expected seconds as a number, got {ttl!r}", param="ttl")
        value, field = ttl, "ttl"
    return None if value is None else parse_keep_alive(value, field=field)


def prepare(config: Config, body: Any, kind: str, *, now: datetime | None = None) -> Prepared:
    """Validate an OpenAI-shaped request and return what to send; kind: chat, completion, embedding."""
    body = dict(require_object(body))
    model = resolve_model(config, body.get("model"))
    keep_alive_s = pop_keep_alive(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream: expected true or false, got {stream!r}", param="stream")
    if kind == "chat" and "messages" not in body:
        raise BadRequest("messages: required", param="messages")
    if kind == "completion" and "prompt" not in body:
        raise BadRequest("prompt: required", param="prompt")
    if kind == "embedding" and "input" not in body:
        raise BadRequest("input: required", param="input")
    if kind == "embedding":
        require_embedding(model)
    return finish(model, body, kind, keep_alive_s, stream and kind != "embedding", now=now)


def clamp_lengths(body: dict[str, Any], context: int | None) -> None:
    """Lower an answer length beyond the model's context to the context, in place.

    Agents ask for more than a small local model holds (Claude Code sends max_tokens 32000);
    a backend would refuse that, while the context is the most it could answer anyway.
    """
    if context is None:
        return
    for key in LENGTH_KEYS:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > context:
            body[key] = context


def forward_keep_alive(model: ModelConfig, body: dict[str, Any], keep_alive_s: float | None) -> None:
    """Put a request's keep_alive back into the body sent to a peer proxy, whose own scheduler applies it
    (it was taken out for this proxy's idle timer). Other backends never see it."""
    if keep_alive_s is not None and model.remote is not None and model.remote.peer is not None:
        body["keep_alive"] = -1 if math.isinf(keep_alive_s) else keep_alive_s


def finish(model: ModelConfig, body: dict[str, Any], kind: str, keep_alive_s: float | None, stream: bool,
           *, now: datetime | None = None) -> Prepared:
    """Return what to send for a validated OpenAI-shaped body: the profile's template, the backend's id."""
    body = apply_template(body, model.template, kind, now or datetime.now().astimezone())
    body["model"] = model.upstream_model
    forward_keep_alive(model, body, keep_alive_s)
    if kind != "embedding":
        clamp_lengths(body, context_length(model))
    if model.backend == "tabbyapi" and kind == "completion" and all(body.get(key) is None for key in LENGTH_KEYS):
        # TabbyAPI's streamed completions fail without a length (it adds to None: "Completion
        # aborted"); 0 is its own "fill the context", what it does for a missing max_tokens elsewhere.
        body["max_tokens"] = 0
    return Prepared(model=model, body=body, keep_alive_s=keep_alive_s, stream=stream)
