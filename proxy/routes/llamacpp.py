"""llama.cpp's router-mode model management (/models, /models/load, /models/unload, /props).

Listing and /props answer from the profiles, the catalog and the manager's snapshot: they never
load, swap or keep a model alive. Loading and unloading go through the manager's methods, as
/unload does; for a peer's model, through that peer's own routes. Errors are in OpenAI's shape,
which is llama.cpp's own.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

import proxy
from proxy.app_context import ProxyContext
from proxy.catalog import catalog_for
from proxy.config import ModelConfig
from proxy.errors import BadRequest, ProxyError, render_openai_error
from proxy.exchange import json_body
from proxy.manager import ModelStatus
from proxy.peers import is_peer_model
from proxy.pipeline import resolve_model

bp = Blueprint("llamacpp", __name__)

# llama.cpp's status values; a stopping model takes no new requests, so it no longer counts as loaded.
STATUS_VALUES = {"ready": "loaded", "starting": "loading", "stopping": "unloaded", "stopped": "unloaded",
                 "failed": "unloaded"}


@bp.before_request
def require_key() -> None:
    ProxyContext.current().authorize(admin=request.method == "POST")  # load and unload change state


@bp.errorhandler(ProxyError)
def render_error(error: ProxyError) -> Response:
    return render_openai_error(error)


@bp.get("/models")
def list_models() -> Response:
    context = ProxyContext.current()
    config = context.config
    models = [model_entry(config.models[status.name], status) for status in context.manager.snapshot()
              if status.name in config.models]
    return jsonify({"object": "list", "data": models})


def model_entry(model: ModelConfig, status: ModelStatus) -> dict[str, Any]:
    """Return a profile as llama.cpp's router lists a model: `status.value`, its args, its context."""
    context = ProxyContext.current()
    n_ctx = catalog_for(context.config).entries[model.name].context_length
    shown = context.listed_state(model, status.state)
    state: dict[str, Any] = {"value": STATUS_VALUES.get(shown, "unloaded"),
                             "args": ["--ctx-size", str(n_ctx)] if n_ctx else []}
    if shown == "failed":
        state["failed"] = True
    entry: dict[str, Any] = {"id": model.name, "object": "model", "owned_by": "proxy",
                             "created": int(context.started_at), "aliases": list(model.aliases),
                             "in_cache": True, "path": model_path(model), "status": state}
    if n_ctx:
        entry["meta"] = {"n_ctx": n_ctx}
    return entry


@bp.post("/models/load")
def load() -> Response:
    """Load a model (waiting, up to queue_timeout, for the load or a swap); answer when it is ready."""
    model = requested_model()
    context = ProxyContext.current()
    if is_peer_model(model):  # the peer's own scheduler decides what it evicts for it
        context.peers.forward(model, "/models/load", {"model": model.upstream_model})
    cancelled = request.environ.get("waitress.client_disconnected")
    context.manager.acquire(model.name, cancelled=cancelled).release()  # the idle timer starts now
    return jsonify({"success": True})


@bp.post("/models/unload")
def unload() -> Response:
    """Unload a model once its running answers end (as /unload does); 503 after queue_timeout."""
    model = requested_model()
    context = ProxyContext.current()
    if is_peer_model(model):
        context.peers.forward(model, "/models/unload", {"model": model.upstream_model})
    context.manager.unload(model.name)
    return jsonify({"success": True})


@bp.get("/props")
def props() -> Response:
    """Answer llama.cpp's /props for a model from its profile and the catalog; never loads it."""
    context = ProxyContext.current()
    model = resolve_model(context.config, request.args.get("model"))
    entry = catalog_for(context.config).entries[model.name]
    state = context.listed_state(model, next((status.state for status in context.manager.snapshot()
                                              if status.name == model.name), "stopped"))
    return jsonify({
        "default_generation_settings": {"n_ctx": entry.context_length or 0, "params": dict(model.template.defaults)},
        "total_slots": 1,
        "model_alias": model.name,
        "model_path": model_path(model),
        "chat_template": "",
        "modalities": {"vision": "vision" in entry.capabilities, "audio": False},
        "build_info": f"model-proxy {proxy.__version__}",
        "is_sleeping": state != "ready",
        "status": {"value": STATUS_VALUES.get(state, "unloaded")},
    })


def requested_model() -> ModelConfig:
    """Return the profile a load or unload body names; 400 without a model, 404 for an unknown one."""
    body = json_body()
    if not isinstance(body, dict):
        raise BadRequest('the request body must be a JSON object like {"model": "name"}')
    if body.get("model") in (None, ""):
        raise BadRequest("model: required", param="model")
    return resolve_model(ProxyContext.current().config, body["model"])


def model_path(model: ModelConfig) -> str:
    """Return the weights a profile loads when the proxy knows them, else its name."""
    settings = model.llamacpp
    if settings is not None and settings.model_path is not None:
        return settings.model_path.name  # the file's name only: full paths are for /status's admins
    return model.upstream_model
