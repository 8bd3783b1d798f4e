"""The Ollama dialect: pure translations between Ollama's API and the OpenAI shapes backends speak.

Requests (options, messages, images, tools, think, format), stream chunks into NDJSON records, the
final `done` record with its metrics, whole answers, embeddings, names and times. Standard library
only: no Flask, no requests, no clocks (callers pass the times in, or a clock).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, Literal

from proxy.dialects.backend import completion_tokens, error_message_from_upstream, generation_ns, prompt_ns, prompt_tokens
from proxy.dialects.samplers import SAMPLERS, SamplerNames
from proxy.dialects.tools import ToolCall, ToolCallAssembler, backend_function
from proxy.errors import BadRequest, UpstreamError
from proxy.streaming import SSEParser, ndjson

_INTEGER_OPTIONS = frozenset({"top_k", "repeat_last_n", "seed", "num_keep", "mirostat", "num_predict", "num_ctx"})
_IMAGE_TYPES = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))
ROLES = ("system", "user", "assistant", "tool")
NEVER_S = 2 ** 63 / 1e9  # Ollama shows "forever" as now + 2^63 ns


# ----- requests -------------------------------------------------------------------------------------

def openai_options_from_ollama(options: object, names: SamplerNames, context_length: int | None = None) -> dict[str, Any]:
    """Return backend sampler fields for Ollama `options`; 400 on a wrongly typed value."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise BadRequest(f"options: expected an object, got {type(options).__name__}")
    fields: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise BadRequest(f'option "stop" must be a list of strings, got {value!r}')
            fields["stop"] = value
        elif key == "num_predict":
            tokens = _number(key, value)
            if tokens >= 0:  # -1 (no limit) and -2 (fill the context) mean: leave it out
                fields["max_tokens"] = int(min(tokens, context_length) if context_length else tokens)
        elif key in SAMPLERS:
            number = _number(key, value)
            target = SAMPLERS[key][names]
            if target is not None and not (key == "repeat_penalty" and number == 0):  # 0 means unset
                fields[target] = number
    return fields


def _number(key: str, value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f'option "{key}" must be a number, got {value!r}')
    if key in _INTEGER_OPTIONS and value != int(value):
        raise BadRequest(f'option "{key}" must be an integer, got {value!r}')
    return int(value) if key in _INTEGER_OPTIONS else value


def openai_messages_from_ollama(messages: object) -> list[dict[str, Any]]:
    """Return OpenAI chat messages: images as content parts, tool calls with string arguments."""
    if not isinstance(messages, list):
        raise BadRequest("messages: expected a list of messages")
    converted: list[dict[str, Any]] = []
    pending_calls: list[tuple[str, str]] = []  # (id, name) of calls not yet answered, oldest first
    for number, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{number}]: expected an object")
        role = message.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{number}].role: expected one of {', '.join(ROLES)}, got {role!r}")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{number}].content: expected a string")
        out: dict[str, Any] = {"role": role, "content": content}
        images = message.get("images")
        if images:
            out["content"] = content_parts(content, images, f"messages[{number}].images")
        if role == "assistant" and message.get("tool_calls"):
            out["tool_calls"] = _openai_tool_calls(message["tool_calls"], number, len(converted))
            pending_calls += [(call["id"], call["function"]["name"]) for call in out["tool_calls"]]
        if role == "tool":
            call_id = message.get("tool_call_id") or _match_tool_call(pending_calls, message.get("tool_name"))
            pending_calls = [call for call in pending_calls if call[0] != call_id]
            if call_id:
                out["tool_call_id"] = call_id
        converted.append(out)
    return converted


def _openai_tool_calls(calls: object, number: int, position: int) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise BadRequest(f"messages[{number}].tool_calls: expected a list")
    converted = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"messages[{number}].tool_calls[{index}].function.name: required")
        arguments = function.get("arguments", {})
        converted.append({
            "id": call.get("id") or f"call_{position}_{index}",
            "type": "function",
            "function": {"name": function["name"],
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)},
        })
    return converted


def _match_tool_call(pending: list[tuple[str, str]], name: object) -> str | None:
    """Pair a tool result without an id with the latest unanswered call of that tool (or the latest)."""
    for call_id, call_name in reversed(pending):
        if name is None or call_name == name:
            return call_id
    return None


def content_parts(text: str, images: object, where: str) -> list[dict[str, Any]]:
    """Return OpenAI content parts: the text, then each base64 image as a data URL."""
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise BadRequest(f"{where}: expected a list of base64 strings")
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for image in images:
        parts.append({"type": "image_url", "image_url": {"url": image if image.startswith("data:") else data_url(image, where)}})
    return parts


def data_url(encoded: str, where: str) -> str:
    """Return a data URL for a base64 image, its type read from the magic bytes."""
    try:
        head = base64.b64decode(encoded[:64] + "=" * (-len(encoded[:64]) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: an image is not valid base64") from None
    mime = next((kind for magic, kind in _IMAGE_TYPES if head.startswith(magic)), None)
    if mime is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        mime = "image/webp"
    return f"data:{mime or 'application/octet-stream'};base64,{encoded}"


def openai_tools_from_ollama(tools: object) -> list[dict[str, Any]]:
    """Return tools for the backend; TabbyAPI rejects a function without a description or parameters
    (422), which Ollama accepts, so both are filled in: an empty text, an object schema without fields."""
    if not isinstance(tools, list):
        raise BadRequest("tools: expected a list")
    converted = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"tools[{index}].function.name: required")
        converted.append({"type": "function", "function": backend_function(function)})
    return converted


def format_fields(fmt: object, names: SamplerNames) -> dict[str, Any]:
    """Return the backend's structured-output fields for Ollama's `format` ("json" or a schema)."""
    if fmt is None or fmt == "":
        return {}
    if fmt == "json":
        if names == "tabbyapi":
            return {"json_schema": {"type": "object"}}
        return {"response_format": {"type": "json_object"}}
    if isinstance(fmt, dict):
        if names == "tabbyapi":  # TabbyAPI takes the schema itself, not OpenAI's {name, schema} wrapper
            return {"json_schema": fmt}
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}}
    raise BadRequest(f'format: expected "json" or a JSON schema object, got {fmt!r}')


def think_fields(think: object, names: SamplerNames) -> dict[str, Any]:
    """Return the backend's reasoning switches for Ollama's `think` (bool or "low"/"medium"/"high"/"max")."""
    if think is None:
        return {}
    if isinstance(think, str):
        if think not in ("low", "medium", "high", "max"):
            raise BadRequest(f'think: expected true, false, "low", "medium", "high" or "max", got {think!r}')
        if names == "tabbyapi":
            return {"enable_thinking": True, "reasoning_effort": "high" if think == "max" else think}
        return {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "high" if think == "max" else think}
    if not isinstance(think, bool):
        raise BadRequest(f"think: expected a boolean or a level, got {think!r}")
    if names == "tabbyapi":
        return {"enable_thinking": think}
    return {"chat_template_kwargs": {"enable_thinking": think}}


def openai_chat_from_ollama(body: Mapping[str, Any], names: SamplerNames, context_length: int | None = None) -> dict[str, Any]:
    """Return the OpenAI chat request for an Ollama /api/chat body."""
    request: dict[str, Any] = {"messages": openai_messages_from_ollama(body.get("messages") or [])}
    if body.get("tools"):
        request["tools"] = openai_tools_from_ollama(body["tools"])
    _common_fields(request, body, names, context_length)
    return request


def openai_request_from_generate(body: Mapping[str, Any], names: SamplerNames,
                                 context_length: int | None = None) -> tuple[str, dict[str, Any]]:
    """Return (kind, OpenAI request) for an Ollama /api/generate body: 'chat', or 'completion' for raw/suffix."""
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise BadRequest("prompt: expected a string")
    raw = body.get("raw") is True
    suffix = body.get("suffix")
    if raw and (body.get("template") or body.get("system") or body.get("context")):
        raise BadRequest("raw mode does not support template, system, or context")
    if body.get("template"):
        raise BadRequest("template: not supported by this server (it cannot run Ollama's Go templates); "
                         "send raw: true with a prompt you formatted yourself")
    if suffix and body.get("system"):
        raise BadRequest("system: not supported together with suffix (fill-in-the-middle goes to the raw completion route)")
    if raw or suffix:
        request: dict[str, Any] = {"prompt": prompt}
        if suffix:
            if not isinstance(suffix, str):
                raise BadRequest("suffix: expected a string")
            request["suffix"] = suffix
        if body.get("images"):
            raise BadRequest("images: not supported with raw or suffix")
        _common_fields(request, body, names, context_length)
        return "completion", request
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise BadRequest("system: expected a string")
    user: dict[str, Any] = {"role": "user", "content": prompt}
    if body.get("images"):
        user["content"] = content_parts(prompt, body["images"], "images")
    request = {"messages": ([{"role": "system", "content": system}] if system else []) + [user]}
    _common_fields(request, body, names, context_length)
    return "chat", request


def _common_fields(request: dict[str, Any], body: Mapping[str, Any], names: SamplerNames,
                   context_length: int | None) -> None:
    request.update(openai_options_from_ollama(body.get("options"), names, context_length))
    request.update(format_fields(body.get("format"), names))
    request.update(think_fields(body.get("think"), names))
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None:
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20:
            raise BadRequest("top_logprobs must be between 0 and 20")
        request["top_logprobs"] = top_logprobs
    if body.get("logprobs") is True:
        request["logprobs"] = True


# ----- responses ------------------------------------------------------------------------------------

def rfc3339_ns(time_ns: int) -> str:
    """Return a UTC timestamp with 9 fractional digits, as Ollama writes created_at."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def rfc3339_local(moment: datetime) -> str:
    """Return a timestamp with 9 fractional digits and its UTC offset (modified_at, expires_at)."""
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{moment.microsecond:06d}000"
    offset = moment.strftime("%z")  # "+0100", or "" for a naive time
    return f"{stamp}Z" if offset in ("", "+0000") else f"{stamp}{offset[:3]}:{offset[3:]}"


class OllamaStream:
    """Turns a backend's OpenAI chunks into Ollama records, and ends them with the `done` record.

    One per request. Times are monotonic nanoseconds given by the caller. `raw` is the generate
    request's own flag: only a non-raw generate's done record carries `context`.
    """

    def __init__(self, *, model: str, kind: Literal["chat", "generate"], think: object, started_ns: int,
                 raw: bool = False) -> None:
        self.model = model
        self.kind = kind
        self.raw = raw
        self.keep_thinking = think is not False
        self.started_ns = started_ns
        self.content: list[str] = []
        self.thinking: list[str] = []
        self.tool_calls = ToolCallAssembler()             # buffered until complete
        self.sent_calls: list[ToolCall] = []              # complete calls already streamed
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.timings: dict[str, Any] = {}
        self.deltas = 0
        self.first_token_ns: int | None = None
        self.last_token_ns: int | None = None

    def feed(self, chunk: Mapping[str, Any], now_ns: int, wall_ns: int) -> list[dict[str, Any]]:
        """Return the records for one OpenAI stream chunk (usually one, sometimes none)."""
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self.timings = chunk["timings"]
        records = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if "text" in choice and not delta:  # a completions stream
                delta = {"content": choice.get("text")}
            text = delta.get("content") or ""
            reasoning = (delta.get("reasoning_content") or delta.get("reasoning") or "") if self.keep_thinking else ""
            for fragment in delta.get("tool_calls") or []:
                self.tool_calls.add(fragment)
            if text or reasoning:
                self._mark_token(now_ns)
                self.content.append(text)
                self.thinking.append(reasoning)
                records.append(self._record(wall_ns, content=text, thinking=reasoning))
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                records += self._flush_tool_calls(wall_ns)
        return records

    def final(self, *, load_ns: int, now_ns: int, wall_ns: int) -> list[dict[str, Any]]:
        """Return the last records of a stream: pending tool calls, then the `done: true` record."""
        records = self._flush_tool_calls(wall_ns)
        done = self._record(wall_ns, content="", thinking="")
        done.update(done=True, **self.metrics(load_ns=load_ns, now_ns=now_ns), **self._context())
        return records + [done]

    def aggregate(self, *, load_ns: int, now_ns: int, wall_ns: int) -> dict[str, Any]:
        """Return the one object of a non-streaming answer: all text, thinking, tool calls and metrics."""
        calls = self.sent_calls + self.tool_calls.complete()
        record = self._record(wall_ns, content="".join(self.content), thinking="".join(self.thinking),
                              tool_calls=calls)
        record.update(done=True, **self.metrics(load_ns=load_ns, now_ns=now_ns), **self._context())
        return record

    def metrics(self, *, load_ns: int, now_ns: int) -> dict[str, Any]:
        """Return done_reason and the six metrics (integers, nanoseconds, each at least 1)."""
        usage, timings = self.usage, self.timings
        first = self.first_token_ns or now_ns
        last = self.last_token_ns or now_ns
        prompt = prompt_ns(usage, timings) or first - self.started_ns - load_ns
        generation = generation_ns(usage, timings) or last - first
        return {
            "done_reason": "length" if self.finish_reason == "length" else "stop",
            "total_duration": max(1, now_ns - self.started_ns),
            "load_duration": max(1, load_ns),
            "prompt_eval_count": max(1, prompt_tokens(usage, timings) or 1),
            "prompt_eval_duration": max(1, int(prompt)),
            "eval_count": max(1, completion_tokens(usage, timings) or self.deltas or 1),
            "eval_duration": max(1, int(generation)),
        }

    def _context(self) -> dict[str, Any]:
        # Ollama ends a non-raw generate with the token context, and clients such as the Vercel AI
        # SDK's Ollama provider reject a done record without it. The proxy does not tokenize (and
        # ignores a client's `context`), so the list is empty, which those clients accept.
        return {"context": []} if self.kind == "generate" and not self.raw else {}

    def _mark_token(self, now_ns: int) -> None:
        self.deltas += 1
        if self.first_token_ns is None:
            self.first_token_ns = now_ns
        self.last_token_ns = now_ns

    def _record(self, wall_ns: int, *, content: str, thinking: str,
                tool_calls: list[ToolCall] | None = None) -> dict[str, Any]:
        record: dict[str, Any] = {"model": self.model, "created_at": rfc3339_ns(wall_ns)}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            record["message"] = message
        else:
            record["response"] = content
            if thinking:
                record["thinking"] = thinking
        record["done"] = False
        return record

    def _flush_tool_calls(self, wall_ns: int) -> list[dict[str, Any]]:
        if not self.tool_calls or self.kind != "chat":
            return []
        calls = self.tool_calls.take()
        self.sent_calls += calls
        return [self._record(wall_ns, content="", thinking="", tool_calls=calls)]


def ollama_embeddings_from_openai(response: Mapping[str, Any], *, dimensions: int | None = None,
                                  normalize: bool = True) -> list[list[float]]:
    """Return the vectors of an OpenAI embeddings answer in input order; cut and L2-normalised as Ollama does."""
    items = sorted(response.get("data") or [], key=lambda item: item.get("index", 0))
    vectors = []
    for item in items:
        vector = [float(value) for value in item.get("embedding") or []]
        if dimensions:
            vector = vector[:dimensions]
        if normalize:
            norm = math.sqrt(sum(value * value for value in vector))
            vector = [value / norm for value in vector] if norm else vector
        vectors.append(vector)
    return vectors


def ollama_name(name: str) -> str:
    """Return a name with a tag, as Ollama lists them (clients add :latest to bare names)."""
    return name if re.search(r":[^/]+$", name) else f"{name}:latest"


# ----- the stream transform -------------------------------------------------------------------------

Clock = Callable[[], tuple[int, int]]
"""Return (monotonic ns, wall-clock ns): when a record is made, and what its created_at says."""


class OllamaRecords:
    """Ollama's stream transform (a StreamTransform): a backend's SSE bytes in, NDJSON records out.

    flush() ends the stream with its pending tool calls and the `done` record. An in-band backend
    error, or tool-call arguments that are not JSON, raise UpstreamError (502): the exchange ends the
    stream with Ollama's `{"error"}` line. With gather=True nothing leaves; answer() then returns the
    one object of a non-stream answer.
    """

    def __init__(self, stream: OllamaStream, *, load_ns: int, clock: Clock, model_name: str,
                 gather: bool = False) -> None:
        self._stream = stream
        self._load_ns = load_ns
        self._clock = clock
        self._model_name = model_name  # the profile, named in error messages
        self._gather = gather
        self._sse = SSEParser()
        self._ended = False  # [DONE] was seen: nothing after it counts
        self._error: UpstreamError | None = None  # raised on the next call: the records before it leave first

    def feed(self, data: bytes) -> bytes:
        self._raise_pending()
        return self._events(self._sse.feed(data))

    def feed_chunk(self, chunk: Mapping[str, Any]) -> bytes:
        """Take one OpenAI chunk (already parsed) and return its records."""
        now_ns, wall_ns = self._clock()
        try:
            records = self._stream.feed(chunk, now_ns, wall_ns)
        except ValueError as exc:
            raise UpstreamError(502, f"{self._model_name}: {exc}") from exc
        return b"" if self._gather else b"".join(ndjson(record) for record in records)

    def flush(self) -> bytes:
        self._raise_pending()
        out = self._events(self._sse.flush())
        self._raise_pending()
        if self._gather:
            return out
        now_ns, wall_ns = self._clock()
        try:
            records = self._stream.final(load_ns=self._load_ns, now_ns=now_ns, wall_ns=wall_ns)
        except ValueError as exc:
            raise UpstreamError(502, f"{self._model_name}: {exc}") from exc
        return out + b"".join(ndjson(record) for record in records)

    def answer(self) -> dict[str, Any]:
        """Return the gathered answer: all text, thinking, tool calls and the metrics."""
        now_ns, wall_ns = self._clock()
        try:
            return self._stream.aggregate(load_ns=self._load_ns, now_ns=now_ns, wall_ns=wall_ns)
        except ValueError as exc:
            raise UpstreamError(502, f"{self._model_name}: {exc}") from exc

    def _events(self, events: list[str]) -> bytes:
        out = []
        for data in events:
            if self._ended:
                continue
            if data == "[DONE]":
                self._ended = True
                continue
            try:
                event = json.loads(data)
            except ValueError:
                continue  # not JSON: nothing of ours
            if isinstance(event, dict) and "error" in event:
                self._error = UpstreamError(502, f"{self._model_name}: {error_message_from_upstream(data.encode(), 200)}")
                self._ended = True
                break
            if isinstance(event, dict):
                out.append(self.feed_chunk(event))
        if self._error is not None and not out:
            self._raise_pending()
        return b"".join(out)

    def _raise_pending(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error
