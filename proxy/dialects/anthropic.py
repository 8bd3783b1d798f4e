"""The Anthropic Messages dialect: a Messages request as the backend's chat completion, and the
backend's OpenAI chunks back as Anthropic's event stream (or its one Message object).

Requests: system, messages and their blocks, samplers, tools, tool_choice, thinking; answers: the
event sequence of https://docs.anthropic.com/en/api/messages-streaming, stop reasons and usage;
count_tokens' text and estimate. Standard library only: no Flask, no requests, no clocks (the
route passes the message id in).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from proxy.dialects.backend import BackendChunks, completion_tokens, prompt_tokens
from proxy.dialects.ollama import think_fields
from proxy.dialects.samplers import SAMPLERS, SamplerNames
from proxy.dialects.tools import backend_function
from proxy.errors import BadRequest, UpstreamError

ROLES = ("user", "assistant", "system")
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
# Where OpenAI-compatible servers say which stop string ended the answer (TabbyAPI, vLLM, SGLang).
MATCHED_STOP_KEYS = ("stop_str", "matched_stop", "stop_reason", "stopping_word")
CHARS_PER_TOKEN = 4      # the estimate of count_tokens when no tokenizer is at hand
TOKENS_PER_MESSAGE = 4   # the role markers a chat template adds around each message


# ----- requests -------------------------------------------------------------------------------------

def openai_chat_from_anthropic(body: Mapping[str, Any], names: SamplerNames, context_length: int | None = None,
                               *, counting: bool = False) -> dict[str, Any]:
    """Return the OpenAI chat request for an Anthropic Messages body; 400 naming a malformed field.

    counting=True reads a count_tokens body, which has no max_tokens. A max_tokens beyond the
    model's context is cut to it (agents ask for 32000 whatever the model). `thinking` never
    refuses a request: a malformed value is ignored, as are `metadata` and Anthropic-only fields.
    """
    system = _system_text(body.get("system"), "system")
    messages: list[dict[str, Any]] = []
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list):
        raise BadRequest("messages: expected a list of messages", param="messages")
    for number, message in enumerate(raw_messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"{where}.role: expected one of {', '.join(ROLES)}", param="messages")
        if message["role"] == "system":  # Claude Code sends one besides `system`; templates want one, first
            system += _system_text(message.get("content"), f"{where}.content")
            continue
        messages += _openai_messages(message["role"], message.get("content"), where)
    system = [text for text in system if text]
    request: dict[str, Any] = {"messages": ([{"role": "system", "content": "\n\n".join(system)}] if system else [])
                               + messages}
    if not counting:
        request["max_tokens"] = _max_tokens(body.get("max_tokens"), context_length)
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(item, str) for item in stop):
            raise BadRequest("stop_sequences: expected a list of strings", param="stop_sequences")
        if stop:
            request["stop"] = stop
    for key in ("temperature", "top_p", "top_k"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise BadRequest(f"{key}: expected a number, got {value!r}", param=key)
        target = SAMPLERS[key][names]
        if target is not None:
            request[target] = int(value) if key == "top_k" else value
    tools = openai_tools_from_anthropic(body.get("tools"))
    if tools:
        request["tools"] = tools
    request.update(_tool_choice(body.get("tool_choice"), bool(tools)))
    request.update(_thinking(body.get("thinking"), names))
    return request


def _max_tokens(value: object, context_length: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"max_tokens: expected a positive integer, got {value!r}", param="max_tokens")
    return min(value, context_length) if context_length else value


def _system_text(system: object, where: str) -> list[str]:
    """Return the text of a system prompt: a string, or text blocks (other keys, e.g. cache_control, ignored)."""
    if system is None or system == "":
        return []
    if isinstance(system, str):
        return [system]
    if isinstance(system, list):
        texts = []
        for index, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise BadRequest(f"{where}[{index}]: expected a text block", param="system")
            texts.append(block["text"])
        return ["\n\n".join(texts)]
    raise BadRequest(f"{where}: expected a string or a list of text blocks", param="system")


def _openai_messages(role: str, content: object, where: str) -> list[dict[str, Any]]:
    """Return the OpenAI messages for one Anthropic message: tool results become tool messages (first,
    as they answer the assistant's calls just before), the rest one user or assistant message."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content: expected a string or a list of content blocks", param="messages")
    parts: list[dict[str, Any]] = []
    tool_messages: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    thinking: list[str] = []
    for index, block in enumerate(content):
        at = f"{where}.content[{index}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if not isinstance(block, dict) or not isinstance(kind, str):
            raise BadRequest(f"{at}: expected a content block with a type", param="messages")
        if kind == "text":
            parts.append({"type": "text", "text": _string(block, "text", at)})
        elif kind == "image" and role == "user":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"), at)}})
        elif kind == "tool_use" and role == "assistant":
            arguments = block.get("input", {})
            if not isinstance(arguments, dict):
                raise BadRequest(f"{at}.input: expected an object", param="messages")
            calls.append({"id": _string(block, "id", at), "type": "function",
                          "function": {"name": _string(block, "name", at), "arguments": json.dumps(arguments)}})
        elif kind == "tool_result" and role == "user":
            tool_messages.append({"role": "tool", "tool_call_id": _string(block, "tool_use_id", at),
                                  "content": _tool_result_text(block, at)})
        elif kind == "thinking":
            thinking.append(str(block.get("thinking") or ""))
        elif kind == "redacted_thinking":
            continue  # encrypted for Anthropic's models: nothing a local model can read
        else:
            raise BadRequest(f"{at}.type: {kind!r} is not supported in a {role} message (text, image, tool_use, "
                             "tool_result and thinking are)", param="messages")
    out = list(tool_messages)
    if role == "assistant":
        if parts or calls or thinking or not tool_messages:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(part["text"] for part in parts)}
            if calls:
                message["tool_calls"] = calls
            if any(thinking):
                message["reasoning_content"] = "".join(thinking)
            out.append(message)
    elif parts or not tool_messages:
        only_text = all(part["type"] == "text" for part in parts)
        out.append({"role": "user", "content": "".join(part["text"] for part in parts) if only_text else parts})
    return out


def _string(block: Mapping[str, Any], key: str, where: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"{where}.{key}: expected a string", param="messages")
    return value


def _image_url(source: object, where: str) -> str:
    if isinstance(source, dict) and source.get("type") == "base64":
        if not isinstance(source.get("media_type"), str) or not isinstance(source.get("data"), str):
            raise BadRequest(f"{where}.source: a base64 image needs media_type and data", param="messages")
        return f"data:{source['media_type']};base64,{source['data']}"
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return str(source["url"])
    raise BadRequest(f"{where}.source: expected a base64 or url image source", param="messages")


def _tool_result_text(block: Mapping[str, Any], where: str) -> str:
    """Return a tool result as the text a tool message carries (text blocks joined; images noted)."""
    content = block.get("content", "")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        pieces = []
        for item in content:
            if isinstance(item, dict) and item.get("type") == "text":
                pieces.append(str(item.get("text") or ""))
            elif isinstance(item, dict) and item.get("type") == "image":
                pieces.append("[image]")  # OpenAI tool messages carry text only
            else:
                raise BadRequest(f"{where}.content: expected text or image blocks", param="messages")
        text = "\n".join(pieces)
    else:
        raise BadRequest(f"{where}.content: expected a string or a list of blocks", param="messages")
    return f"Error: {text}" if block.get("is_error") is True else text


def openai_tools_from_anthropic(tools: object) -> list[dict[str, Any]]:
    """Return function tools for the backend; Anthropic's server tools (web search, ...) have no schema
    a local model could fill, so they are left out."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequest("tools: expected a list", param="tools")
    converted = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise BadRequest(f"tools[{index}].name: required", param="tools")
        if tool.get("type") not in (None, "custom"):
            continue
        schema = tool.get("input_schema")
        if schema is not None and not isinstance(schema, dict):
            raise BadRequest(f"tools[{index}].input_schema: expected a JSON schema object", param="tools")
        function = {"name": tool["name"], "description": tool.get("description"), "parameters": schema}
        converted.append({"type": "function", "function": backend_function(function)})
    return converted


def _tool_choice(choice: object, has_tools: bool) -> dict[str, Any]:
    if choice is None or not has_tools:
        return {}
    kind = choice.get("type") if isinstance(choice, dict) else None
    fields: dict[str, Any] = {}
    if kind == "auto":
        fields["tool_choice"] = "auto"
    elif kind == "any":
        fields["tool_choice"] = "required"
    elif kind == "none":
        fields["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice, dict) and isinstance(choice.get("name"), str):
        fields["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise BadRequest('tool_choice: expected {"type": "auto"}, "any", "none" or {"type": "tool", "name": ...}',
                         param="tool_choice")
    if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True:
        fields["parallel_tool_calls"] = False
    return fields


def _thinking(thinking: object, names: SamplerNames) -> dict[str, Any]:
    """Return the backend's reasoning switch: enabled and adaptive turn it on, disabled off. A model
    without reasoning ignores the switch, so it is passed on whatever the model."""
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind in ("enabled", "adaptive"):
        return think_fields(True, names)
    if kind == "disabled":
        return think_fields(False, names)
    return {}


# ----- count_tokens ---------------------------------------------------------------------------------

def prompt_text(request: Mapping[str, Any]) -> str:
    """Return a translated request's prompt as plain text, for a tokenizer or the estimate: each
    message as `role: content`, tool calls and tool definitions as JSON."""
    lines = []
    for message in request.get("messages") or []:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        lines.append(f"{message.get('role')}: {content or ''}")
        if message.get("reasoning_content"):
            lines.append(str(message["reasoning_content"]))
        for call in message.get("tool_calls") or []:
            lines.append(json.dumps(call["function"]))
    for tool in request.get("tools") or []:
        lines.append(json.dumps(tool["function"]))
    return "\n".join(lines)


def estimated_tokens(request: Mapping[str, Any]) -> int:
    """Return count_tokens' estimate when no tokenizer is at hand: one token per CHARS_PER_TOKEN
    characters of prompt_text, rounded up, plus TOKENS_PER_MESSAGE per message."""
    images = sum(1 for message in request.get("messages") or [] if isinstance(message.get("content"), list)
                 for part in message["content"] if isinstance(part, dict) and part.get("type") == "image_url")
    characters = len(prompt_text(request))
    return -(-characters // CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(request.get("messages") or []) + 256 * images


# ----- answers --------------------------------------------------------------------------------------

def sse_event(name: str, payload: Mapping[str, Any]) -> bytes:
    """Return one Anthropic SSE event: its name and its JSON (whose `type` repeats the name)."""
    return f"event: {name}\ndata: ".encode() + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class AnthropicEvents:
    """Anthropic's stream transform (a StreamTransform): a backend's SSE chunks in, Messages events out.

    The first output is message_start (with the input tokens the caller estimated) and a ping; each
    content block (thinking, text, tool_use) is started, given its deltas, and stopped before the
    next one starts; flush() stops the last block and sends message_delta (stop reason, the real
    usage) and message_stop. An in-band backend error raises UpstreamError (502) after the events
    before it: the exchange ends the stream with an `error` event. With gather=True nothing leaves,
    and message() returns the one Message object of a non-stream answer.
    """

    def __init__(self, *, message_id: str, model: str, model_name: str, input_tokens: int,
                 gather: bool = False) -> None:
        self._id = message_id
        self._model = model                # as the client sent it: every answer echoes it
        self._model_name = model_name      # the profile, named in error messages
        self._input_tokens = input_tokens  # until the backend's usage says
        self._gather = gather
        self._chunks = BackendChunks(model_name)
        self._started = False
        self._blocks: list[dict[str, Any]] = []   # the content so far; tool_use input as its JSON text
        self._open: str | None = None              # the kind of the block being streamed, if any
        self._tool_blocks: dict[int, int] = {}     # backend tool-call index -> block index
        self._finish: str | None = None
        self._stop_sequence: str | None = None
        self._usage: dict[str, Any] = {}
        self._timings: dict[str, Any] = {}
        self._deltas = 0

    def feed(self, data: bytes) -> bytes:
        out = b"".join([self.feed_chunk(chunk) for chunk in self._chunks.feed(data)])
        if not out:
            self._chunks.raise_pending()  # nothing to send first: an in-band error ends it now
        return out

    def feed_chunk(self, chunk: Mapping[str, Any]) -> bytes:
        """Take one OpenAI chunk (already parsed) and return its events."""
        out = [self._start()]
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self._timings = chunk["timings"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # Messages has one answer
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            if reasoning:
                out.append(self._delta("thinking", {"type": "thinking_delta", "thinking": reasoning}))
            if delta.get("content"):
                out.append(self._delta("text", {"type": "text_delta", "text": delta["content"]}))
            for fragment in delta.get("tool_calls") or []:
                out.append(self._tool_fragment(fragment))
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                matched = next((choice[key] for key in MATCHED_STOP_KEYS if isinstance(choice.get(key), str)), None)
                self._stop_sequence = matched or None
        return self._emit(out)

    def flush(self) -> bytes:
        out = b"".join([self.feed_chunk(chunk) for chunk in self._chunks.flush()])
        self._chunks.raise_pending()
        events = [self._start(), self._close()]
        usage: dict[str, Any] = {"output_tokens": self._output_tokens()}
        if prompt_tokens(self._usage, self._timings):
            usage = {"input_tokens": self._input(), **usage}
        events.append(sse_event("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": self._stop_reason(), "stop_sequence": self._matched_stop()}, "usage": usage}))
        events.append(sse_event("message_stop", {"type": "message_stop"}))
        return out + self._emit(events)

    def message(self) -> dict[str, Any]:
        """Return the gathered answer: the Message object, tool inputs parsed (their key order kept)."""
        content = []
        for block in self._blocks:
            if block["type"] == "tool_use":
                content.append({**block, "input": self._tool_input(block)})
            else:
                content.append(dict(block))
        return {"id": self._id, "type": "message", "role": "assistant", "model": self._model, "content": content,
                "stop_reason": self._stop_reason(), "stop_sequence": self._matched_stop(),
                "usage": {"input_tokens": self._input(), "output_tokens": self._output_tokens()}}

    # ----- blocks ---------------------------------------------------------------------------------

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        message: dict[str, Any] = {"id": self._id, "type": "message", "role": "assistant", "model": self._model,
                                   "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self._input_tokens, "output_tokens": 0}}
        return sse_event("message_start", {"type": "message_start", "message": message}) + \
            sse_event("ping", {"type": "ping"})

    def _open_block(self, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._blocks.append(block)
        self._open = block["type"]
        start = {**block, "input": {}} if block["type"] == "tool_use" else block
        return out + sse_event("content_block_start", {"type": "content_block_start", "index": len(self._blocks) - 1,
                                                       "content_block": start})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return sse_event("content_block_stop", {"type": "content_block_stop", "index": len(self._blocks) - 1})

    def _delta(self, kind: str, delta: dict[str, Any]) -> bytes:
        self._deltas += 1
        out = b""
        if self._open != kind:
            out = self._open_block({"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking"
                                   else {"type": "text", "text": ""})
        self._blocks[-1][kind] += delta[kind]
        return out + sse_event("content_block_delta", {"type": "content_block_delta", "index": len(self._blocks) - 1,
                                                       "delta": delta})

    def _tool_fragment(self, fragment: Mapping[str, Any]) -> bytes:
        """Stream one tool-call fragment: llama.cpp sends id and name first, then the arguments in
        pieces, keyed by index; TabbyAPI sends each call whole."""
        index = int(fragment.get("index", len(self._tool_blocks)))
        function = fragment.get("function") or {}
        out = b""
        if index not in self._tool_blocks:
            out = self._open_block({"type": "tool_use", "id": str(fragment.get("id") or f"toolu_{self._id}_{index}"),
                                    "name": str(function.get("name") or ""), "input": ""})
            self._tool_blocks[index] = len(self._blocks) - 1
        elif self._tool_blocks[index] != len(self._blocks) - 1:
            raise UpstreamError(502, f"{self._model_name}: the backend interleaved the arguments of two tool calls")
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments)
        if isinstance(arguments, str) and arguments:
            self._deltas += 1
            self._blocks[-1]["input"] += arguments
            out += sse_event("content_block_delta", {"type": "content_block_delta", "index": len(self._blocks) - 1,
                                                     "delta": {"type": "input_json_delta", "partial_json": arguments}})
        return out

    def _tool_input(self, block: Mapping[str, Any]) -> dict[str, Any]:
        try:
            value = json.loads(block["input"] or "{}")
        except ValueError:
            raise UpstreamError(502, f"{self._model_name}: the backend sent tool call {block['name']!r} with "
                                     f"arguments that are not JSON: {block['input'][:200]!r}") from None
        if not isinstance(value, dict):
            raise UpstreamError(502, f"{self._model_name}: the backend sent tool call {block['name']!r} with "
                                     "arguments that are not an object")
        return value

    # ----- the end --------------------------------------------------------------------------------

    def _stop_reason(self) -> str:
        if self._finish == "length":
            return "max_tokens"
        if any(block["type"] == "tool_use" for block in self._blocks):
            return "tool_use"  # some backends end a call with "stop"
        if self._matched_stop() is not None:
            return "stop_sequence"
        return STOP_REASONS.get(self._finish or "stop", "end_turn")

    def _matched_stop(self) -> str | None:
        return self._stop_sequence if self._finish == "stop" else None

    def _input(self) -> int:
        return prompt_tokens(self._usage, self._timings) or self._input_tokens

    def _output_tokens(self) -> int:
        return completion_tokens(self._usage, self._timings) or self._deltas

    def _emit(self, events: list[bytes]) -> bytes:
        return b"" if self._gather else b"".join(events)

