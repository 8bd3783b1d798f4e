"""What every dialect reads from a backend's OpenAI-shaped answers: its stream as parsed chunks,
error bodies, a whole answer as one stream chunk, and the usage and timings that token counts and
durations come from."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from proxy.errors import UpstreamError
from proxy.streaming import SSEParser


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


class BackendChunks:
    """A backend's chat stream as parsed OpenAI chunks, incrementally (every dialect's translator reads
    one): SSE framing, `[DONE]` ends it, data that is not JSON is skipped, and an in-band
    `{"error": ...}` becomes UpstreamError (502) naming the model.

    An error found after some chunks is held, so that the translator's output for those leaves first:
    the next feed() or flush() raises it, or the translator calls raise_pending() when it has nothing
    to send now.
    """

    def __init__(self, model_name: str) -> None:
        self._model_name = model_name  # the profile, named in error messages
        self._sse = SSEParser()
        self._ended = False  # [DONE] or an error was seen: nothing after it counts
        self._error: UpstreamError | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self.raise_pending()
        return self._chunks(self._sse.feed(data))

    def flush(self) -> list[dict[str, Any]]:
        self.raise_pending()
        return self._chunks(self._sse.flush())

    def raise_pending(self) -> None:
        """Raise the in-band error found so far, if any (once)."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _chunks(self, events: list[str]) -> list[dict[str, Any]]:
        chunks = []
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
                message = error_message_from_upstream(data.encode(), 200)
                self._error = UpstreamError(502, f"{self._model_name}: {message}")
                self._ended = True
                break
            if isinstance(event, dict):
                chunks.append(event)
        return chunks
