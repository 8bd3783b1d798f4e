"""What every dialect reads from a backend's OpenAI-shaped answers: error bodies, a whole answer as
one stream chunk, and the usage and timings that token counts and durations come from."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def error_message_from_upstream(body: bytes, status: int) -> str:
    """Return the message of a backend's error body (OpenAI, TabbyAPI `detail`, or text)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return text[:500] if text else f"the backend answered HTTP {status}"
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        detail = parsed.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):  # FastAPI validation errors
            return "; ".join(f"{'.'.join(map(str, item.get('loc', [])))}: {item.get('msg')}"
                             for item in detail if isinstance(item, dict)) or str(detail)
    return f"the backend answered HTTP {status}: {str(parsed)[:300]}"


def chunk_from_response(response: Mapping[str, Any]) -> dict[str, Any]:
    """Return a whole (non-stream) OpenAI answer as one stream chunk, so one code path reads both."""
    choices = []
    for choice in response.get("choices") or []:
        message = dict(choice.get("message") or {})
        if "text" in choice and not message:  # a completions answer
            message = {"content": choice.get("text")}
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message["tool_calls"] = [{"index": index, **call} for index, call in enumerate(calls)]
        choices.append({"index": choice.get("index", 0), "delta": message, "finish_reason": choice.get("finish_reason")})
    chunk: dict[str, Any] = {"choices": choices}
    for key in ("usage", "timings"):
        if isinstance(response.get(key), dict):
            chunk[key] = response[key]
    return chunk


def nanoseconds(value: object, scale: float) -> int:
    """Return a backend's duration (seconds: scale 1e9; milliseconds: 1e6) in nanoseconds; 0 if absent."""
    return int(value * scale) if isinstance(value, int | float) and value > 0 else 0


def prompt_tokens(usage: Mapping[str, Any], timings: Mapping[str, Any]) -> int:
    """Return the prompt's token count: OpenAI usage, or llama.cpp's timings; 0 if neither says."""
    return int(usage.get("prompt_tokens") or timings.get("prompt_n") or 0)


def completion_tokens(usage: Mapping[str, Any], timings: Mapping[str, Any]) -> int:
    """Return the answer's token count: OpenAI usage, or llama.cpp's timings; 0 if neither says."""
    return int(usage.get("completion_tokens") or timings.get("predicted_n") or 0)


def prompt_ns(usage: Mapping[str, Any], timings: Mapping[str, Any]) -> int:
    """Return the prompt's processing time: llama.cpp's prompt_ms or TabbyAPI's prompt_time; 0 if absent."""
    return nanoseconds(timings.get("prompt_ms"), 1e6) or nanoseconds(usage.get("prompt_time"), 1e9)


def generation_ns(usage: Mapping[str, Any], timings: Mapping[str, Any]) -> int:
    """Return the generation time: llama.cpp's predicted_ms or TabbyAPI's completion_time; 0 if absent."""
    return nanoseconds(timings.get("predicted_ms"), 1e6) or nanoseconds(usage.get("completion_time"), 1e9)
