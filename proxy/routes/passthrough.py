"""Pass-through of the model-addressed routes no dialect translates (rerank, audio, images,
TabbyAPI's tokenizer): find the model in the JSON body or the multipart field `model`, then the
exchange (lease, forward, relay). Multipart bodies go to the backend byte for byte, from a file.
"""

from __future__ import annotations

import tempfile
from typing import IO, Any

from flask import Blueprint, Response, request
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from proxy import exchange
from proxy.app_context import ProxyContext
from proxy.errors import BadRequest, ProxyError, render_openai_error, sse_error_event
from proxy.exchange import Opened, json_body
from proxy.pipeline import MAX_MODEL_NAME, Prepared, forward_keep_alive, pop_keep_alive, require_object, resolve_model
from proxy.upstream import RawBody

bp = Blueprint("passthrough", __name__)

PATHS = ("/v1/rerank", "/rerank", "/v1/audio/transcriptions", "/v1/audio/speech", "/v1/images/generations",
         "/v1/token/encode", "/v1/token/decode")
READ_SIZE = 64 * 1024
IN_MEMORY_MAX = 1024 * 1024  # a multipart body beyond this is spooled to a temporary file
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@bp.before_request
def require_key() -> None:
    ProxyContext.current().authorize()


@bp.errorhandler(ProxyError)
def render_error(error: ProxyError) -> Response:
    return render_openai_error(error)


def forward() -> Response:
    """Send the request to the same path on its model's backend and relay the answer as it comes."""
    config = ProxyContext.current().config
    path = request.path + (f"?{request.query_string.decode('latin-1')}" if request.query_string else "")
    if request.mimetype == "multipart/form-data":
        spool, size, requested = spooled_multipart()
        with spool:
            model = resolve_model(config, requested)
            prepared = Prepared(model=model, body={}, keep_alive_s=None, stream=False)
            raw = RawBody(spool, size, request.content_type or "multipart/form-data")
            return exchange.run(prepared, path, answer, raw=raw)
    body = dict(require_object(json_body()))
    model = resolve_model(config, body.get("model"))
    keep_alive_s = pop_keep_alive(body)
    if "model" in body:
        body["model"] = model.upstream_model  # the backend's own id, as on every route
    forward_keep_alive(model, body, keep_alive_s)
    prepared = Prepared(model=model, body=body, keep_alive_s=keep_alive_s, stream=False)
    return exchange.run(prepared, path, answer)


for _path in PATHS:
    bp.add_url_rule(_path, endpoint=_path.strip("/").replace("/", "_"), view_func=forward, methods=["POST"])


def answer(opened: Opened) -> Response:
    """Relay the backend's answer with its status and Content-Type; an error answer is read whole."""
    if opened.status >= 400:
        return Response(opened.read(), status=opened.status, content_type=opened.content_type)
    if opened.is_sse:
        return exchange.relay_answer(opened, None, sse_error_event, content_type=opened.content_type,
                                     headers=STREAM_HEADERS)
    return exchange.relay_answer(opened, None, cut_body, content_type=opened.content_type)


def cut_body(error: ProxyError) -> bytes:
    """End a plain answer that broke off by cutting the connection: a truncated body, never a wrong one."""
    raise error


def spooled_multipart() -> tuple[IO[bytes], int, str | None]:
    """Copy the multipart body into a spool (memory up to IN_MEMORY_MAX, then a temporary file) and
    return it rewound, its size, and the form field `model` (None when absent).

    The field is found while the body is copied, by a streaming parser that discards file parts,
    so no part of an upload is ever held whole. Raises BadRequest for a body that is not multipart.
    """
    _, options = parse_options_header(request.content_type)
    boundary = options.get("boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary in its Content-Type")
    finder = ModelField(boundary.encode("latin-1"))
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=IN_MEMORY_MAX)  # noqa: SIM115  # the caller closes it
    try:
        size = 0
        stream = request.stream
        while chunk := stream.read(READ_SIZE):
            spool.write(chunk)
            size += len(chunk)
            finder.feed(chunk)
        finder.feed(None)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool, size, finder.model


class ModelField:
    """Find the `model` field of a multipart body fed in pieces; stops parsing once it is found."""

    def __init__(self, boundary: bytes) -> None:
        self._decoder = MultipartDecoder(boundary)
        self._in_model = False
        self._value = bytearray()
        self._done = False
        self.model: str | None = None

    def feed(self, chunk: bytes | None) -> None:
        if self._done:
            return
        try:
            self._decoder.receive_data(chunk)
            event: Any = self._decoder.next_event()
            while not isinstance(event, NeedData | Epilogue):
                self._take(event)
                if self._done:
                    return
                event = self._decoder.next_event()
        except ValueError as exc:  # werkzeug's word for a body that breaks the multipart grammar
            raise BadRequest(f"the multipart body cannot be parsed: {exc}") from None
        if isinstance(event, Epilogue):
            self._done = True

    def _take(self, event: Any) -> None:
        if isinstance(event, Field):
            self._in_model, self._value = event.name == "model", bytearray()
        elif isinstance(event, File):
            self._in_model = False
        elif isinstance(event, Data) and self._in_model:
            self._value += event.data
            if len(self._value) > MAX_MODEL_NAME:
                raise BadRequest("model: not a valid model name", param="model")
            if not event.more_data:
                self.model = self._value.decode("utf-8", errors="replace")
                self._done = True
