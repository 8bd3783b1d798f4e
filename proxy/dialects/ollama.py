"""The Ollama dialect, requests: Ollama's chat and generate bodies as the OpenAI requests backends take.

Options (with each backend's sampler names), messages, images, tools, think and format. The answers
going back (NDJSON records, the done record, embeddings) are in ollama_records.py. Standard library
only: no Flask, no requests, no clocks.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any

from proxy.dialects.samplers import SAMPLERS, SamplerNames
from proxy.dialects.tools import backend_function
from proxy.errors import BadRequest

_INTEGER_OPTIONS = frozenset({"top_k", "repeat_last_n", "seed", "num_keep", "mirostat", "num_predict", "num_ctx"})
_IMAGE_TYPES = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))
ROLES = ("system", "user", "assistant", "tool")


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
