"""Load progress for clients: a streaming OpenAI request that waits for a load gets its stream at once,
with progress while it waits (SSE comments, or reasoning text for profiles that ask), against the
real proxy.py and fake backends that take seconds to start. Read with raw SSE and the openai SDK.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import openai

from tests.conftest import API_KEY, ProxyProcess, fake_profile

Start = Callable[..., ProxyProcess]
SLOW = ("--startup-delay", "3")


def stream_lines(proxy: ProxyProcess, model: str) -> tuple[list[tuple[float, bytes]], float]:
    """Send a streaming chat; return its SSE lines with when each arrived, and when the headers did."""
    started = time.monotonic()
    response = proxy.post("/v1/chat/completions", {"model": model, "stream": True, "max_tokens": 4,
                                                   "messages": [{"role": "user", "content": "hi"}]}, stream=True)
    opened_after = time.monotonic() - started
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    lines = [(time.monotonic() - started, line) for line in response.iter_lines() if line]
    return lines, opened_after


def test_a_cold_stream_opens_at_once_with_progress_comments_before_the_answer(start_proxy: Start) -> None:
    proxy = start_proxy({"alpha": fake_profile(*SLOW)})

    lines, opened_after = stream_lines(proxy, "alpha")

    assert opened_after < 2  # the load takes 3 s: the stream did not wait for it
    comments = [line for _, line in lines if line.startswith(b":")]
    data = [line for _, line in lines if line.startswith(b"data:")]
    assert len(comments) >= 2 and all(b"loading alpha" in line or b"waiting" in line for line in comments)
    first_data = next(index for index, (_, line) in enumerate(lines) if line.startswith(b"data:"))
    assert all(line.startswith(b":") for _, line in lines[:first_data])  # progress only before the answer
    assert data[-1] == b"data: [DONE]"
    content = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                      for line in data[:-1] if json.loads(line[6:])["choices"])
    assert content  # the answer itself is intact

    proxy.get("/unload", admin=True)  # the second load is estimated from the first one's time
    lines, _ = stream_lines(proxy, "alpha")
    assert any(b"of about 3s" in line or b"of about 4s" in line for _, line in lines if line.startswith(b":"))


def test_a_ready_model_streams_without_progress(start_proxy: Start) -> None:
    proxy = start_proxy({"alpha": fake_profile()})
    assert proxy.chat("alpha").status_code == 200

    lines, _ = stream_lines(proxy, "alpha")

    assert not [line for _, line in lines if line.startswith(b":")]


def test_reasoning_progress_shows_in_an_openai_client(start_proxy: Start) -> None:
    proxy = start_proxy({"alpha": fake_profile(*SLOW, load_progress="reasoning")})
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

    reasoning, content = [], []
    for chunk in client.chat.completions.create(model="alpha", stream=True, max_tokens=4,
                                                messages=[{"role": "user", "content": "hi"}]):
        if not chunk.choices:
            continue
        delta: Any = chunk.choices[0].delta
        if getattr(delta, "reasoning_content", None):
            reasoning.append(delta.reasoning_content)
        if delta.content:
            content.append(delta.content)

    assert reasoning and all("alpha" in text for text in reasoning)
    assert content and chunk.model == "alpha"


def test_a_load_that_fails_ends_the_open_stream_with_an_in_band_error(start_proxy: Start) -> None:
    proxy = start_proxy({"broken": fake_profile("--startup-delay", "1.5", "--exit-during-startup")})

    lines, _ = stream_lines(proxy, "broken")

    assert lines[0][1].startswith(b":")
    error = json.loads(lines[-1][1][6:])
    assert error["error"]["code"] == "backend_failed" and "broken" in error["error"]["message"]


def test_a_refusal_that_comes_at_once_is_still_an_http_error(start_proxy: Start) -> None:
    proxy = start_proxy({"huge": fake_profile(*SLOW, footprint={"ram": "64GiB"})}, proxy={"ram_budget": "1GiB"})

    answer = proxy.post("/v1/chat/completions", {"model": "huge", "stream": True,
                                                 "messages": [{"role": "user", "content": "hi"}]})

    assert answer.status_code == 503 and answer.json()["error"]["code"] == "insufficient_memory"
