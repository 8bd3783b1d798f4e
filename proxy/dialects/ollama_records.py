"""The Ollama dialect, answers: a backend's OpenAI chunks as Ollama's NDJSON records, ending with the
`done` record and its metrics; whole answers, embeddings, names and times as Ollama writes them.

The requests going out are in ollama.py. Standard library only: no Flask, no requests, no clocks
(callers pass the times in, or a clock).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, Literal

from proxy.dialects.backend import BackendChunks, completion_tokens, generation_ns, prompt_ns, prompt_tokens
from proxy.dialects.tools import ToolCall, ToolCallAssembler
from proxy.errors import UpstreamError
from proxy.streaming import ndjson

NEVER_S = 2 ** 63 / 1e9  # Ollama shows "forever" as now + 2^63 ns


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
        self._chunks = BackendChunks(model_name)

    def feed(self, data: bytes) -> bytes:
        out = b"".join([self.feed_chunk(chunk) for chunk in self._chunks.feed(data)])
        if not out:
            self._chunks.raise_pending()  # nothing to send first: an in-band error ends it now
        return out

    def feed_chunk(self, chunk: Mapping[str, Any]) -> bytes:
        """Take one OpenAI chunk (already parsed) and return its records."""
        now_ns, wall_ns = self._clock()
        try:
            records = self._stream.feed(chunk, now_ns, wall_ns)
        except ValueError as exc:
            raise UpstreamError(502, f"{self._model_name}: {exc}") from exc
        return b"" if self._gather else b"".join(ndjson(record) for record in records)

    def flush(self) -> bytes:
        out = b"".join([self.feed_chunk(chunk) for chunk in self._chunks.flush()])
        self._chunks.raise_pending()
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
