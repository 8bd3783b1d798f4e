"""Ollama routes (/ and /api/*): HTTP glue around the Ollama dialect and the exchange.

Streams are NDJSON, one record per token, always ending with a `done` record or an `{"error"}`
line. The mapping itself lives in dialects/ollama.py; the catalog in catalog.py.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from flask import Blueprint, Response, jsonify, request

from proxy import exchange
from proxy.app_context import ProxyContext
from proxy.auth import presented_keys
from proxy.catalog import catalog_for
from proxy.config import ModelConfig
from proxy.dialects.backend import chunk_from_response
from proxy.dialects.ollama import openai_chat_from_ollama, openai_request_from_generate
from proxy.dialects.ollama_records import (
    NEVER_S,
    OllamaRecords,
    OllamaStream,
    ollama_embeddings_from_openai,
    ollama_name,
    rfc3339_local,
    rfc3339_ns,
)
from proxy.dialects.samplers import sampler_names
from proxy.errors import BadRequest, Forbidden, ProxyError, UnknownModel, Unsupported, UpstreamError, render_ollama_error
from proxy.exchange import Opened, json_body
from proxy.manager import Lease, ModelStatus
from proxy.memory import RAM
from proxy.peers import is_peer_model
from proxy.pipeline import MAX_MODEL_NAME, finish, pop_keep_alive, require_embedding
from proxy.profiles import is_pattern
from proxy.streaming import ndjson

log = logging.getLogger(__name__)

bp = Blueprint("ollama", __name__)

OPEN_ENDPOINTS = frozenset({"ollama.root", "ollama.version"})
NDJSON = "application/x-ndjson"
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "embedding": "/v1/embeddings"}
# Template defaults are OpenAI fields; /api/show lists them under Ollama's option names.
OLLAMA_PARAMETER_NAMES = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty",
                          "repeat_penalty": "repeat_penalty", "typical": "typical_p", "penalty_range": "repeat_last_n"}


@bp.before_request
def require_key() -> None:
    if request.endpoint not in OPEN_ENDPOINTS:
        ProxyContext.current().authorize()


@bp.errorhandler(ProxyError)
def render_error(error: ProxyError) -> Response:
    return render_ollama_error(error)


# ----- catalog --------------------------------------------------------------------------------------

@bp.route("/", methods=["GET", "HEAD"])
def root() -> Response:
    return Response("Ollama is running", mimetype="text/plain")


@bp.route("/api/version", methods=["GET", "HEAD"])
def version() -> Response:
    context = ProxyContext.current()
    if presented_keys(request.headers):  # open to keyless probes; a wrong key must not pass "verify connection"
        context.keys.check(request.headers)
    return jsonify({"version": ProxyContext.current().config.proxy.ollama_version})


@bp.route("/api/tags", methods=["GET", "HEAD"])
def tags() -> Response:
    config = ProxyContext.current().config
    catalog = catalog_for(config)
    models = [entry.tag(ollama_name(name))
              for entry in catalog.entries.values() for name in (entry.model.name, *entry.model.aliases)
              if not is_pattern(name)]  # a pattern (claude-*) is no model a client could pick
    return jsonify({"models": models})


@bp.post("/api/show")
def show() -> Response:
    context = ProxyContext.current()
    model, _ = requested_model(request_body())
    entry = catalog_for(context.config).entries[model.name]
    parameters = parameter_lines(model, entry.context_length)
    architecture = entry.details["family"] or "unknown"
    model_info: dict[str, Any] = {"general.architecture": architecture}
    if entry.context_length:
        model_info[f"{architecture}.context_length"] = entry.context_length
    template = ("{{ if .Suffix }}{{ .Prompt }}{{ .Suffix }}{{ else }}{{ .Prompt }}{{ end }}"
                if "insert" in entry.capabilities else "{{ .Prompt }}")
    system = model.template.system or ""
    modelfile = "\n".join([f"FROM {model.name}", *(f"PARAMETER {line}" for line in parameters)]
                          + ([f'SYSTEM """{system}"""'] if system else []))
    return jsonify({
        "modelfile": modelfile + "\n",
        "parameters": "\n".join(parameters),
        "template": template,
        "system": system,
        "license": model.license,
        "details": entry.details,
        "model_info": model_info,
        "capabilities": list(entry.capabilities),
        "modified_at": entry.modified_at,
    })


def parameter_lines(model: ModelConfig, context_length: int | None) -> list[str]:
    """Return the profile's defaults as Ollama `key value` lines (num_ctx first; stop repeated)."""
    lines = [f"{'num_ctx':<30} {context_length}"] if context_length else []
    for key, value in model.template.defaults.items():
        name = OLLAMA_PARAMETER_NAMES.get(key, key)
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{name:<30} {json.dumps(item) if isinstance(item, str) else item}")
    return lines


@bp.get("/api/ps")
def ps() -> Response:
    context = ProxyContext.current()
    catalog = catalog_for(context.config)
    now = datetime.now().astimezone()
    running = []
    for status in context.manager.snapshot():
        entry = catalog.entries.get(status.name)
        # A peer's model counts as loaded when the peer says it is (this proxy only routes to it).
        if entry is None or context.listed_state(entry.model, status.state) not in ("starting", "ready"):
            continue
        if status.expires_at is not None:
            expires = status.expires_at.astimezone()
        else:  # in use or starting: Ollama shows now + duration (the timer starts when idle)
            expires = now + timedelta(seconds=min(status.keep_alive_s, NEVER_S))
        size, size_vram = _loaded_size(entry.model, status, entry.size, entry.size_vram)
        # Every name /api/tags lists for the model, so that UIs mark each of its entries as loaded.
        for name in map(ollama_name, (status.name, *(alias for alias in entry.model.aliases if not is_pattern(alias)))):
            running.append((expires, {
                "name": name, "model": name, "size": size, "digest": entry.digest, "details": entry.details,
                "expires_at": rfc3339_local(expires), "size_vram": size_vram,
                "context_length": entry.context_length or 0,
            }))
    running.sort(key=lambda pair: pair[0], reverse=True)  # stable: a model's names stay together
    return jsonify({"models": [record for _, record in running]})


def _loaded_size(model: ModelConfig, status: ModelStatus, size: int, size_vram: int) -> tuple[int, int]:
    """Return /api/ps's size and size_vram: what the profile's details declare, else the memory the model
    takes (placed or measured, else its footprint), else the catalog's figures (its files)."""
    holds = status.holds
    if holds:
        measured = sum(holds.values()), sum(bytes_ for device, bytes_ in holds.items() if device != RAM)
    elif status.need.total:
        measured = status.need.total, status.need.vram
    else:
        measured = size, size_vram
    return (size if model.details.size is not None else measured[0],
            size_vram if model.details.size_vram is not None else measured[1])


# ----- generation -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OllamaRequest:
    """What every generation route reads first."""

    started_ns: int
    body: dict[str, Any]
    model: ModelConfig
    requested: str            # the name as the client sent it: records echo it
    keep_alive_s: float | None
    stream: bool

    @classmethod
    def read(cls) -> OllamaRequest:
        started_ns = time.monotonic_ns()
        body = request_body()
        model, requested = requested_model(body)
        keep_alive_s = pop_keep_alive(body)
        return cls(started_ns, body, model, requested, keep_alive_s, stream_flag(body))


@bp.post("/api/chat")
def chat() -> Response:
    call = OllamaRequest.read()
    if not call.body.get("messages"):  # empty or absent: Ollama's load/unload shortcut
        return load_shortcut(call.model, call.requested, call.keep_alive_s, "chat")
    require_capabilities(call.model, call.body, "chat")
    openai_body = openai_chat_from_ollama(call.body, sampler_names(call.model.sampler_kind), catalog_context(call.model))
    return generate_answer(call, "chat", "chat", openai_body)


@bp.post("/api/generate")
def generate() -> Response:
    call = OllamaRequest.read()
    if not call.body.get("prompt") and not call.body.get("suffix"):
        return load_shortcut(call.model, call.requested, call.keep_alive_s, "generate")
    require_capabilities(call.model, call.body, "generate")
    kind, openai_body = openai_request_from_generate(call.body, sampler_names(call.model.sampler_kind),
                                                     catalog_context(call.model))
    return generate_answer(call, "generate", kind, openai_body)


def generate_answer(call: OllamaRequest, record_kind: Literal["chat", "generate"], kind: str,
                    openai_body: dict[str, Any]) -> Response:
    """Send the translated request upstream (always streaming, with usage) and answer in Ollama's shape."""
    openai_body["stream"] = True  # one code path: non-streaming answers are gathered from the stream
    openai_body["stream_options"] = {"include_usage": True}  # the done record's counts come from usage
    prepared = finish(call.model, openai_body, kind, call.keep_alive_s, True)
    return exchange.run(prepared, PATHS[kind], lambda opened: ollama_answer(opened, call, record_kind))


def ollama_answer(opened: Opened, call: OllamaRequest, record_kind: Literal["chat", "generate"]) -> Response:
    """Answer with NDJSON records as the backend's tokens come, or with the gathered answer."""
    opened.check_status()
    stream = OllamaStream(model=call.requested, kind=record_kind, think=call.body.get("think"),
                          started_ns=call.started_ns, raw=call.body.get("raw") is True)
    records = OllamaRecords(stream, load_ns=int(opened.lease.waited_s * 1e9), clock=clock,
                            model_name=call.model.name, gather=not call.stream)
    if opened.is_sse and call.stream:
        return exchange.relay_answer(opened, records, ndjson_error, content_type=NDJSON)
    if opened.is_sse:
        exchange.gather(opened, records)
        return jsonify(records.answer())
    try:  # a backend that ignored "stream": its whole answer is one chunk
        whole = json.loads(opened.read())
    except ValueError as exc:
        raise UpstreamError(502, f"{call.model.name}: the backend's answer is not JSON") from exc
    lines = records.feed_chunk(chunk_from_response(whole)) + records.flush()
    return Response(lines, mimetype=NDJSON) if call.stream else jsonify(records.answer())


def clock() -> tuple[int, int]:
    return time.monotonic_ns(), time.time_ns()


def ndjson_error(error: ProxyError) -> bytes:
    """End an Ollama stream that broke off: one `{"error"}` line instead of the done record."""
    return ndjson({"error": error.message})


def load_shortcut(model: ModelConfig, requested: str, keep_alive_s: float | None, kind: str) -> Response:
    """Ollama's empty request: load the model (or, with keep_alive 0, unload it) and say which.

    For a peer's model the same empty request goes to the peer first, whose scheduler decides.
    """
    context = ProxyContext.current()
    manager = context.manager
    if is_peer_model(model):
        shortcut: dict[str, Any] = {"model": model.upstream_model}
        if keep_alive_s is not None:
            shortcut["keep_alive"] = -1 if math.isinf(keep_alive_s) else keep_alive_s
        context.peers.forward(model, "/api/generate", {**shortcut, "stream": False})
    if keep_alive_s == 0:
        manager.unload_when_idle(model.name)  # never loads first; stops once its requests end
        reason = "unload"
    else:
        manager.acquire(model.name, keep_alive_s, cancelled=request.environ.get("waitress.client_disconnected")).release()
        reason = "load"
    record: dict[str, Any] = {"model": requested, "created_at": rfc3339_ns(time.time_ns())}
    if kind == "chat":
        record["message"] = {"role": "assistant", "content": ""}
    elif kind == "generate":
        record["response"] = ""
    record.update(done=True, done_reason=reason)
    return jsonify(record)


# ----- embeddings -----------------------------------------------------------------------------------

@bp.post("/api/embed")
def embed() -> Response:
    call = OllamaRequest.read()
    body, model, requested, keep_alive_s = call.body, call.model, call.requested, call.keep_alive_s
    given = body.get("input")
    if given in (None, "", []):
        load_shortcut(model, requested, keep_alive_s, "embed")
        return jsonify({"model": requested, "embeddings": []})
    if not isinstance(given, str) and not (isinstance(given, list) and all(isinstance(item, str) for item in given)):
        raise BadRequest("invalid input type")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise BadRequest("dimensions: expected a positive integer")
    require_capabilities(model, body, "embed")
    answer, lease = fetch_embeddings(model, given, keep_alive_s)
    usage = answer.get("usage") or {}
    return jsonify({
        "model": requested,
        "embeddings": ollama_embeddings_from_openai(answer, dimensions=dimensions),
        "total_duration": max(1, time.monotonic_ns() - call.started_ns),
        "load_duration": max(1, int(lease.waited_s * 1e9)),
        "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
    })


@bp.post("/api/embeddings")
def embeddings() -> Response:
    call = OllamaRequest.read()
    body, model, requested, keep_alive_s = call.body, call.model, call.requested, call.keep_alive_s
    prompt = body.get("prompt")
    if not prompt:
        load_shortcut(model, requested, keep_alive_s, "embeddings")
        return jsonify({"embedding": []})
    if not isinstance(prompt, str):
        raise BadRequest("prompt: expected a string")
    require_capabilities(model, body, "embed")
    answer, _ = fetch_embeddings(model, prompt, keep_alive_s)
    vectors = ollama_embeddings_from_openai(answer, normalize=False)  # the legacy route never normalised
    return jsonify({"embedding": vectors[0] if vectors else []})


def fetch_embeddings(model: ModelConfig, given: str | list[str], keep_alive_s: float | None) -> tuple[dict[str, Any], Lease]:
    prepared = finish(model, {"input": given}, "embedding", keep_alive_s, False)

    def read_answer(opened: Opened) -> tuple[dict[str, Any], Lease]:
        opened.check_status()
        try:
            return json.loads(opened.read()), opened.lease
        except ValueError as exc:
            raise UpstreamError(502, f"{model.name}: the backend's embeddings are not JSON") from exc

    return exchange.run(prepared, PATHS["embedding"], read_answer)


# ----- model files: this server does not manage them ------------------------------------------------

@bp.post("/api/pull")
def pull() -> Response:
    body = request_body()
    requested_model(body)  # 404 for unknown models, before any line
    if stream_flag(body):
        return Response(ndjson({"status": "pulling manifest"}) + ndjson({"status": "success"}), mimetype=NDJSON)
    return jsonify({"status": "success"})


@bp.route("/api/delete", methods=["DELETE"])
def delete() -> Response:
    raise Forbidden("deleting models is disabled: this server does not manage model files "
                    "(remove the profile from model_configs/ instead)")


@bp.post("/api/copy")
def copy() -> Response:
    raise Forbidden("copying models is disabled: this server does not manage model files "
                    "(add an alias to the profile in model_configs/ instead)")


@bp.post("/api/create")
@bp.post("/api/push")
@bp.route("/api/blobs/<digest>", methods=["POST", "HEAD"])
def unsupported(digest: str | None = None) -> Response:
    raise Unsupported("not supported by this server: it does not manage model files")


# ----- helpers --------------------------------------------------------------------------------------

def request_body() -> dict[str, Any]:
    if not request.get_data(cache=True):
        raise BadRequest("missing request body")
    body = json_body()
    if body is None:
        try:
            json.loads(request.get_data(cache=True))  # only to word the error as Ollama does
        except ValueError as exc:
            raise BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def requested_model(body: dict[str, Any]) -> tuple[ModelConfig, str]:
    """Return the profile and the name exactly as the client sent it (responses echo it)."""
    requested = body.get("model") or body.get("name")
    if not requested:
        raise BadRequest("model is required")
    if not isinstance(requested, str) or len(requested) > MAX_MODEL_NAME or "\x00" in requested:
        raise BadRequest("model: expected a model name")
    model = ProxyContext.current().config.resolve_model(requested)
    if model is None:
        raise UnknownModel(f"model '{requested}' not found")
    return model, requested


def stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream", True)  # Ollama streams unless told not to
    if not isinstance(stream, bool):
        raise BadRequest(f"stream: expected true or false, got {stream!r}")
    return stream


def catalog_context(model: ModelConfig) -> int | None:
    return catalog_for(ProxyContext.current().config).entries[model.name].context_length


def require_capabilities(model: ModelConfig, body: dict[str, Any], route: str) -> None:
    """Refuse what the profile says the model cannot do (only when the profile lists capabilities,
    or for embeddings, when it is known not to serve them)."""
    if route == "embed":
        require_embedding(model)  # its message names the profile key that enables embeddings
    if model.capabilities is None:
        return
    needed = {"embed": ["embedding"]}.get(route, ["completion"])
    if body.get("tools"):
        needed.append("tools")
    if body.get("think") not in (None, False):
        needed.append("thinking")
    if body.get("suffix"):
        needed.append("insert")
    if body.get("images") or any(isinstance(message, dict) and message.get("images")
                                 for message in body.get("messages") or []):
        needed.append("vision")
    for capability in needed:
        if capability not in model.capabilities:
            verb = {"completion": "generate", "embedding": "embeddings"}.get(capability, capability)
            raise BadRequest(f'"{model.name}" does not support {verb}')
