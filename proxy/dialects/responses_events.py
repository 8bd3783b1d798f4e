"""The OpenAI Responses dialect, answers: a backend's chat stream as Responses' events or one Response.

ResponsesEvents is the stream transform (reasoning, text and tool calls as output items, usage, the
final response.completed or response.failed); response_skeleton() the Response before any output.
Standard library only; the caller passes ids and times in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from proxy.dialects.backend import BackendChunks, completion_tokens, prompt_tokens
from proxy.errors import ProxyError, UpstreamError


def response_skeleton(body: Mapping[str, Any], *, response_id: str, created_at: int, model: str) -> dict[str, Any]:
    """Return the Response object before any output: the request's settings echoed, as OpenAI does."""
    reasoning = _object(body.get("reasoning"))
    text = _object(body.get("text"))
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "model": model, "output": [], "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": False, "temperature": body.get("temperature"),
        "text": {"format": text.get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
        "top_p": body.get("top_p"), "truncation": "disabled", "usage": None,
        "user": body.get("user"), "metadata": body.get("metadata") or {},
    }


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# ----- the stream transform -------------------------------------------------------------------------

def sse_event(event: Mapping[str, Any]) -> bytes:
    """Return one Responses SSE event: its type on the event line, the whole event as data."""
    return (f"event: {event['type']}\ndata: ".encode()
            + json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n")


class ResponsesEvents:
    """Responses' stream transform (a StreamTransform): a backend's chat SSE bytes in, Responses events out.

    The stream opens with response.created and response.in_progress; each run of reasoning, text or
    one tool call is an output item (added, its deltas, done), one closed before the next begins;
    flush() ends with response.completed (response.incomplete when max_output_tokens cut it), which
    carries the whole Response with usage. An in-band backend error, or fragments of a tool call that
    already ended, raise UpstreamError (502); failed_event() then ends the stream with response.failed.
    With gather=True nothing leaves; answer() returns the Response object.
    """

    def __init__(self, skeleton: Mapping[str, Any], *, model_name: str, gather: bool = False) -> None:
        self._response = dict(skeleton)
        self._model_name = model_name  # the profile, named in error messages
        self._gather = gather
        self._base = str(skeleton["id"]).removeprefix("resp_")
        self._chunks = BackendChunks(model_name)
        self._sequence = 0
        self._begun = False
        self._output: list[dict[str, Any]] = []
        self._positions: dict[str, int] = {}       # item id -> its output_index
        self._open: dict[str, Any] | None = None   # the output item in progress
        self._calls: dict[int, dict[str, Any]] = {}  # the backend's tool-call index -> its item
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] = {}
        self._timings: dict[str, Any] = {}

    # -- StreamTransform --

    def feed(self, data: bytes) -> bytes:
        out = b"".join([self._begin(), *(self.feed_chunk(chunk) for chunk in self._chunks.feed(data))])
        if not out:
            self._chunks.raise_pending()  # nothing to send first: an in-band error ends it now
        return out

    def flush(self) -> bytes:
        out = b"".join([self._begin(), *(self.feed_chunk(chunk) for chunk in self._chunks.flush())])
        try:
            self._chunks.raise_pending()
        except UpstreamError as error:
            if self._gather or not out:
                raise
            return out + self.failed_event(error)  # what was made ready leaves, then the failure
        out += self._close()
        status = self._status()
        return out + self._emit({"type": f"response.{status}", "response": self.snapshot(status)})

    def feed_chunk(self, chunk: Mapping[str, Any]) -> bytes:
        """Take one chat chunk (already parsed: a whole answer made one by chunk_from_response)."""
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self._timings = chunk["timings"]
        out = [self._begin()]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # one answer: n > 1 is not part of this dialect
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            if reasoning:
                out.append(self._delta("reasoning", reasoning))
            if delta.get("content"):
                out.append(self._delta("message", delta["content"]))
            for fragment in delta.get("tool_calls") or []:
                out.append(self._tool_fragment(fragment))
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return b"".join(out)

    def answer(self) -> dict[str, Any]:
        """Return the gathered Response object (gather=True, after the exchange fed it all)."""
        self._close()
        return self.snapshot(self._status())

    def failed_event(self, error: ProxyError) -> bytes:
        """End a stream that broke off: response.failed, with the output so far and the error."""
        out = self._begin()
        if self._open is not None:
            self._open["status"] = "incomplete"
            self._open = None
        response = self.snapshot("failed")
        response["error"] = {"code": error.code, "message": error.message}
        return out + self._emit({"type": "response.failed", "response": response})

    def snapshot(self, status: str) -> dict[str, Any]:
        """Return the Response object as it stands, with this status."""
        response = {**self._response, "status": status, "output": [dict(item) for item in self._output]}
        if status != "in_progress":
            response["usage"] = self._usage_object()
        if status == "incomplete":
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        return response

    # -- items --

    def _begin(self) -> bytes:
        if self._begun:
            return b""
        self._begun = True
        return (self._emit({"type": "response.created", "response": self.snapshot("in_progress")})
                + self._emit({"type": "response.in_progress", "response": self.snapshot("in_progress")}))

    def _delta(self, kind: str, text: str) -> bytes:
        out = b""
        if self._open is None or self._open["type"] != kind:
            out += self._close()
            item: dict[str, Any] = ({"id": self._item_id("msg"), "type": "message", "status": "in_progress",
                                     "content": [], "role": "assistant"} if kind == "message" else
                                    {"id": self._item_id("rs"), "type": "reasoning", "summary": [], "content": []})
            out += self._add(item)
            part = ({"type": "output_text", "text": "", "annotations": [], "logprobs": []} if kind == "message"
                    else {"type": "reasoning_text", "text": ""})
            out += self._emit({"type": "response.content_part.added", **self._where(item), "part": dict(part)})
            item["content"] = [part]
        current = self._open
        assert current is not None
        current["content"][0]["text"] += text
        event = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
        return out + self._emit({"type": event, **self._where(current), "delta": text, **extra})

    def _tool_fragment(self, fragment: Mapping[str, Any]) -> bytes:
        index = int(fragment.get("index", len(self._calls)))
        function = fragment.get("function") or {}
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, str):  # TabbyAPI may send an object
            arguments = json.dumps(arguments)
        out = b""
        item = self._calls.get(index)
        if item is None:
            out += self._close()
            item = {"id": self._item_id("fc"), "type": "function_call", "status": "in_progress",
                    "call_id": str(fragment.get("id") or f"call_{self._base}_{index}"),
                    "name": function.get("name") or "", "arguments": ""}
            self._calls[index] = item
            out += self._add(item)
        elif item is not self._open:
            raise UpstreamError(502, f"{self._model_name}: the backend sent more of tool call "
                                     f"{item['name']!r} after another began")
        elif function.get("name"):
            item["name"] += function["name"]
        if arguments:
            item["arguments"] += arguments
            out += self._emit({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                               "output_index": self._positions[item["id"]], "delta": arguments})
        return out

    def _add(self, item: dict[str, Any]) -> bytes:
        self._positions[item["id"]] = len(self._output)
        self._output.append(item)
        self._open = item
        return self._emit({"type": "response.output_item.added", "output_index": len(self._output) - 1,
                           "item": json.loads(json.dumps(item))})

    def _close(self) -> bytes:
        """End the item in progress: its done events, then output_item.done."""
        item, self._open = self._open, None
        if item is None:
            return b""
        where = self._where(item)
        out = b""
        if item["type"] == "function_call":
            item["arguments"] = item["arguments"] or "{}"
            out += self._emit({"type": "response.function_call_arguments.done", "item_id": item["id"],
                               "output_index": where["output_index"], "name": item["name"],
                               "arguments": item["arguments"]})
        else:
            part = item["content"][0]
            kind = "output_text" if item["type"] == "message" else "reasoning_text"
            extra: dict[str, Any] = {"logprobs": []} if kind == "output_text" else {}
            out += self._emit({"type": f"response.{kind}.done", **where, "text": part["text"], **extra})
            out += self._emit({"type": "response.content_part.done", **where, "part": dict(part)})
        if item["type"] != "reasoning":
            item["status"] = "incomplete" if self._finish_reason == "length" else "completed"
        return out + self._emit({"type": "response.output_item.done", "output_index": where["output_index"],
                                 "item": json.loads(json.dumps(item))})

    def _where(self, item: Mapping[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self._positions[item["id"]], "content_index": 0}

    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self._base}_{len(self._output)}"

    def _status(self) -> str:
        return "incomplete" if self._finish_reason == "length" else "completed"

    def _usage_object(self) -> dict[str, Any]:
        usage, timings = self._usage, self._timings
        given = prompt_tokens(usage, timings)
        made = completion_tokens(usage, timings)
        details = _object(usage.get("prompt_tokens_details"))
        made_details = _object(usage.get("completion_tokens_details"))
        return {"input_tokens": given,
                "input_tokens_details": {"cached_tokens": int(details.get("cached_tokens") or timings.get("cache_n") or 0)},
                "output_tokens": made,
                "output_tokens_details": {"reasoning_tokens": int(made_details.get("reasoning_tokens") or 0)},
                "total_tokens": given + made}

    def _emit(self, event: dict[str, Any]) -> bytes:
        framed = {"type": event["type"], "sequence_number": self._sequence, **event}
        self._sequence += 1
        return b"" if self._gather else sse_event(framed)

    # -- the backend's events --

