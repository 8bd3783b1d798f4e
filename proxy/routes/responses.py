"""OpenAI Responses route (/v1/responses): HTTP glue around the Responses dialect and the exchange.

The backend is always asked for a chat stream with usage; a streaming client gets Responses' events,
any other the gathered Response object. Nothing is stored: the routes that read or delete a stored
response say so. The mapping itself lives in dialects/responses.py
(requests) and dialects/responses_events.py (answers).
"""

from __future__ import annotations

import json
import time
import uuid

from flask import Blueprint, Response, jsonify

from proxy import exchange
from proxy.app_context import ProxyContext
from proxy.dialects.backend import chunk_from_response
from proxy.dialects.responses import chat_from_responses
from proxy.dialects.responses_events import ResponsesEvents, response_skeleton
from proxy.dialects.samplers import sampler_names
from proxy.errors import BadRequest, ProxyError, UpstreamError, render_openai_error
from proxy.exchange import Opened, json_body
from proxy.pipeline import finish, pop_keep_alive, require_object, resolve_model

bp = Blueprint("responses", __name__)

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CHAT_PATH = "/v1/chat/completions"


@bp.before_request
def require_key() -> None:
    ProxyContext.current().authorize()


@bp.errorhandler(ProxyError)
def render_error(error: ProxyError) -> Response:
    return render_openai_error(error)


@bp.post("/v1/responses")
def create_response() -> Response:
    body = dict(require_object(json_body()))
    model = resolve_model(ProxyContext.current().config, body.get("model"))
    keep_alive_s = pop_keep_alive(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream: expected true or false, got {stream!r}", param="stream")
    chat = chat_from_responses(body, sampler_names(model.sampler_kind))
    chat["stream"] = True  # one code path: a whole answer is gathered from the stream
    chat["stream_options"] = {"include_usage": True}  # response.completed carries usage
    prepared = finish(model, chat, "chat", keep_alive_s, True)
    skeleton = response_skeleton(body, response_id=f"resp_{uuid.uuid4().hex}", created_at=int(time.time()),
                                 model=body.get("model") or model.name)
    events = ResponsesEvents(skeleton, model_name=model.name, gather=not stream)
    return exchange.run(prepared, CHAT_PATH, lambda opened: answer(opened, events, stream))


def answer(opened: Opened, events: ResponsesEvents, stream: bool) -> Response:
    """Answer with Responses' events as the backend's tokens come, or with the gathered Response."""
    opened.check_status()
    if opened.is_sse and stream:
        return exchange.relay_answer(opened, events, events.failed_event, content_type="text/event-stream",
                                     headers=STREAM_HEADERS)
    if opened.is_sse:
        exchange.gather(opened, events)
        return jsonify(events.answer())
    try:  # a backend that ignored "stream": its whole answer is one chunk
        whole = json.loads(opened.read())
    except ValueError as exc:
        raise UpstreamError(502, f"{opened.lease.model_name}: the backend's answer is not JSON") from exc
    streamed = events.feed_chunk(chunk_from_response(whole)) + events.flush()
    return Response(streamed, content_type="text/event-stream") if stream else jsonify(events.answer())


@bp.route("/v1/responses/<path:response_id>", methods=["GET", "POST", "DELETE"])
def stored_response(response_id: str) -> Response:
    raise BadRequest(f"/v1/responses/{response_id}: not supported: this server does not store responses "
                     "(it is stateless); POST /v1/responses with the whole conversation in `input`")
