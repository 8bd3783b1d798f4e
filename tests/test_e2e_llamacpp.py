"""End to end: the real proxy.py process in front of real llama.cpp servers running SmolLM2 on the CPU.

Two profiles on the same GGUF under different names make the swap tests real swaps.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.conftest import ProxyProcess, llamacpp_profile

Start = Callable[..., ProxyProcess]


def two_profiles(gguf: Path) -> dict[str, dict[str, Any]]:
    return {
        "smol-a": llamacpp_profile(gguf, aliases=["alpha"], llamacpp={"model_path": str(gguf), "n_ctx": 1024,
                                                                     "embedding": True}),
        "smol-b": llamacpp_profile(gguf),
    }


@pytest.fixture
def two_models(start_proxy: Start, gguf: Path) -> ProxyProcess:
    return start_proxy(two_profiles(gguf), proxy={"unload_timer": 60})


def sse_events(response: requests.Response) -> list[str]:
    """Return the data payloads of an SSE response, read as they arrive."""
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            events.append(line[len(b"data: "):].decode())
    return events


def stream_text(events: list[str]) -> str:
    text = ""
    for event in events:
        if event != "[DONE]":
            for choice in json.loads(event).get("choices", []):
                text += (choice.get("delta") or {}).get("content") or ""
    return text


def test_cold_load_chat_stream_completions_and_embeddings(two_models: ProxyProcess) -> None:
    proxy = two_models
    assert proxy.status("smol-a")["state"] == "stopped"
    answer = proxy.chat("smol-a")
    assert answer.status_code == 200, answer.text
    message = answer.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"].strip()
    assert answer.json()["model"] == "smol-a"
    assert proxy.status("smol-a")["state"] == "ready"

    again = proxy.chat("alpha:latest")  # alias with Ollama's tag: same model, same answer at temperature 0
    assert again.json()["choices"][0]["message"]["content"] == message["content"]

    streamed = proxy.chat("smol-a", stream=True, stream_options={"include_usage": True})
    assert streamed.status_code == 200
    assert streamed.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    assert stream_text(events) == message["content"]
    assert any("usage" in json.loads(event) for event in events[:-1])

    completion = proxy.post("/v1/completions", {"model": "smol-a", "prompt": "Once upon a time",
                                                "max_tokens": 6, "temperature": 0})
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"]

    embedding = proxy.post("/v1/embeddings", {"model": "smol-a", "input": ["hello", "world"]})
    assert embedding.status_code == 200, embedding.text
    vectors = [item["embedding"] for item in embedding.json()["data"]]
    assert len(vectors) == 2 and len(vectors[0]) == 576

    assert len(proxy.backends()) == 1


def test_swap_waits_for_a_running_stream(two_models: ProxyProcess) -> None:
    proxy = two_models
    assert proxy.chat("smol-a").status_code == 200
    [backend_a] = proxy.backends()

    stream = proxy.chat("smol-a", content="Write a long story about a dragon.", max_tokens=150, stream=True)
    lines = stream.iter_lines()
    first = next(line for line in lines if line.startswith(b"data: "))
    assert first

    swap: dict[str, Any] = {}
    swapper = threading.Thread(target=lambda: swap.setdefault("response", proxy.chat("smol-b")))
    swapper.start()
    time.sleep(0.3)
    assert proxy.status("smol-b")["queued"] == 1  # waiting, not swapping under the stream
    assert backend_a.is_running()

    rest = [line for line in lines if line.startswith(b"data: ")]
    assert rest[-1] == b"data: [DONE]"  # the stream completed untouched
    assert not any(b'"error"' in line for line in rest)
    swapper.join(30)
    assert swap["response"].status_code == 200, swap["response"].text

    backends = proxy.backends()
    assert len(backends) == 1 and backends[0].pid != backend_a.pid
    assert not psutil.pid_exists(backend_a.pid) or backend_a.status() == psutil.STATUS_ZOMBIE
    assert proxy.status("smol-a")["state"] == "stopped"
    assert proxy.status("smol-b")["state"] == "ready"


def test_concurrent_first_requests_share_one_launch(two_models: ProxyProcess) -> None:
    proxy = two_models
    results: list[requests.Response] = []
    threads = [threading.Thread(target=lambda: results.append(proxy.chat("smol-b"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [response.status_code for response in results] == [200] * 4
    assert proxy.log().count("model smol-b: stopped -> starting") == 1
    assert proxy.status("smol-b")["requests_served"] == 4
    assert len(proxy.backends()) == 1


def test_keep_alive_zero_stops_the_child_after_the_answer(two_models: ProxyProcess) -> None:
    proxy = two_models
    answer = proxy.chat("smol-a", keep_alive=0)
    assert answer.status_code == 200
    assert "keep_alive" not in json.dumps(answer.json())
    [backend] = proxy.backends() or [None]
    proxy.wait_for(lambda: proxy.status("smol-a")["state"] == "stopped", timeout_s=3, what="keep_alive 0 unload")
    assert backend is None or not backend.is_running() or backend.status() == psutil.STATUS_ZOMBIE
    assert proxy.backends() == []


def test_idle_unload_and_negative_keep_alive(start_proxy: Start, gguf: Path) -> None:
    proxy = start_proxy({"smol-a": llamacpp_profile(gguf, unload_timer=1), "smol-b": llamacpp_profile(gguf)},
                        proxy={"max_loaded_models": 2})
    assert proxy.chat("smol-b", keep_alive="-1m").status_code == 200  # never unload
    assert proxy.chat("smol-a").status_code == 200
    released = time.monotonic()
    status = proxy.status("smol-a")
    assert status["expires_at"] is not None and proxy.status("smol-b")["unloads"] == "never"
    proxy.wait_for(lambda: proxy.status("smol-a")["state"] == "stopped", timeout_s=4, what="idle unload")
    assert 0.8 <= time.monotonic() - released < 3.5
    time.sleep(1.5)
    assert proxy.status("smol-b")["state"] == "ready"
    assert len(proxy.backends()) == 1


def test_unload_route_needs_the_admin_key_and_waits_for_streams(start_proxy: Start, gguf: Path) -> None:
    # On a busy 2-core machine SmolLM2 may make only ~2 tokens/s: a short stream, and a
    # queue_timeout far above what it can take, so /unload waits for it and never answers 503.
    proxy = start_proxy(two_profiles(gguf), proxy={"unload_timer": 60, "queue_timeout": 300})
    assert proxy.chat("smol-a").status_code == 200
    assert proxy.get("/unload").status_code == 403  # an API key is not enough
    assert proxy.http.get(proxy.url + "/unload").status_code == 401

    stream = proxy.chat("smol-a", content="Tell me a long story.", max_tokens=32, stream=True)
    lines = stream.iter_lines()
    next(lines)
    started = time.monotonic()
    unloaded: dict[str, Any] = {}
    unloader = threading.Thread(
        target=lambda: unloaded.setdefault("r", proxy.get("/unload", admin=True, timeout=330)))
    unloader.start()
    rest = [line for line in lines if line.startswith(b"data: ")]
    assert rest[-1] == b"data: [DONE]"  # the stream ran to its end under the waiting unload
    unloader.join(330)
    assert "r" in unloaded, "/unload did not answer"
    assert unloaded["r"].status_code == 200 and unloaded["r"].json() == {"unloaded": ["smol-a"]}
    assert time.monotonic() - started > 0.2
    assert proxy.backends() == []

    assert proxy.chat("smol-b").status_code == 200
    response = proxy.post("/unload", {"model": "smol-b"}, admin=True)
    assert response.json() == {"unloaded": ["smol-b"]}
    assert proxy.get("/unload?model=nope", admin=True).status_code == 404


def test_start_failure_is_a_clear_error_and_does_not_stick(start_proxy: Start, gguf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"this is not a GGUF file")
    proxy = start_proxy({"broken": llamacpp_profile(bad), "smol-a": llamacpp_profile(gguf)})
    started = time.monotonic()
    failed = proxy.chat("broken")
    assert time.monotonic() - started < 10  # the child's exit is noticed at once, not by timeout
    assert failed.status_code == 502
    error = failed.json()["error"]
    assert error["code"] == "backend_failed"
    assert "broken" in error["message"] and "exited" in error["message"]
    assert proxy.status("broken")["state"] == "failed"
    broken = next(model for model in proxy.get("/status", admin=True).json()["models"] if model["name"] == "broken")
    assert "cannot start" in broken["last_output"]  # the tail of the backend's own output, for admins

    assert proxy.chat("smol-a").status_code == 200  # the next good request works
    again = proxy.chat("broken")
    assert again.status_code == 502  # tried again, failed again: not stuck
    assert proxy.log().count("model broken: stopped -> starting") + proxy.log().count(
        "model broken: failed -> starting") == 2


def test_backend_killed_mid_stream(two_models: ProxyProcess) -> None:
    proxy = two_models
    stream = proxy.chat("smol-a", content="Tell me a very long story.", max_tokens=300, stream=True)
    lines = stream.iter_lines()
    assert next(line for line in lines if line.startswith(b"data: "))
    [backend] = proxy.backends()
    os.kill(backend.pid, signal.SIGKILL)
    rest = [line for line in lines if line.startswith(b"data: ")]
    assert rest and b'"error"' in rest[-1]  # an explicit in-band error, not a silent end
    assert json.loads(rest[-1][len(b"data: "):])["error"]["code"] == "backend_failed"

    proxy.wait_for(lambda: proxy.status("smol-a")["state"] == "stopped", what="crash noticed")
    assert "unexpectedly" in proxy.status("smol-a")["last_error"]
    assert proxy.chat("smol-a").status_code == 200  # restarted
    [restarted] = proxy.backends()
    assert restarted.pid != backend.pid


def test_client_disconnect_releases_the_lease(two_models: ProxyProcess) -> None:
    proxy = two_models
    stream = proxy.chat("smol-a", content="Tell me a very long story.", max_tokens=400, stream=True,
                        keep_alive="1s")
    lines = stream.iter_lines()
    assert next(line for line in lines if line.startswith(b"data: "))
    assert proxy.status("smol-a")["leases"] == 1
    stream.close()  # the client goes away mid-stream
    closed = time.monotonic()
    proxy.wait_for(lambda: proxy.status("smol-a")["leases"] == 0, timeout_s=3, what="lease release")
    proxy.wait_for(lambda: proxy.status("smol-a")["state"] == "stopped", timeout_s=4, what="unload on time")
    assert time.monotonic() - closed < 3.5


def test_sigterm_leaves_no_backend_running(two_models: ProxyProcess) -> None:
    proxy = two_models
    assert proxy.chat("smol-a").status_code == 200
    backends = proxy.backends()
    assert len(backends) == 1
    assert proxy.stop(signal.SIGTERM) == 0
    assert proxy.surviving_backends() == []


def test_proxy_killed_with_sigkill_takes_its_backend_along(two_models: ProxyProcess) -> None:
    proxy = two_models
    assert proxy.chat("smol-a").status_code == 200
    assert len(proxy.backends()) == 1
    proxy.popen.kill()  # no chance to clean up: the parent-death signal must do it
    proxy.popen.wait(5)
    deadline = time.monotonic() + 5
    while proxy.surviving_backends() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.surviving_backends() == []
