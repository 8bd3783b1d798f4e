"""Memory bounds: a large non-stream answer passes through as it arrives instead of being held whole
(a 1 GiB answer once took the proxy to 3.2 GiB), what a translation must gather whole is bounded by
proxy.max_answer_mb (a clear 502 beyond it), and request bodies in progress together by a budget of
two max_body_mb (four 60 MB bodies once took 1 GB).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from collections.abc import Callable

import psutil

from tests.conftest import FIGURES, ProxyProcess, fake_profile

Start = Callable[..., ProxyProcess]
MB = 1024 * 1024


def peak_rss_during(proxy: ProxyProcess, work: Callable[[], object]) -> tuple[int, object]:
    """Run work() and return the proxy's peak RSS growth over its RSS before, and work's result."""
    process = psutil.Process(proxy.popen.pid)
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return peak - before, result


def test_a_large_non_stream_answer_passes_through_without_being_held(start_proxy: Start) -> None:
    proxy = start_proxy({"embed": fake_profile("--embedding-dims", "4000000")})  # about 20 MB per input
    assert proxy.post("/v1/embeddings", {"model": "embed", "input": "warm up"}).status_code == 200

    def fetch() -> bytes:
        answer = proxy.post("/v1/embeddings", {"model": "embed", "input": ["a", "b", "c"]})
        assert answer.status_code == 200
        return answer.content

    grown, body = peak_rss_during(proxy, fetch)
    assert isinstance(body, bytes) and len(body) > 55 * MB
    parsed = json.loads(body)
    assert [len(item["embedding"]) for item in parsed["data"]] == [4000000] * 3
    assert grown < 30 * MB, f"the proxy grew by {grown / MB:.0f} MiB relaying a {len(body) / MB:.0f} MiB answer"
    FIGURES["peak_rss_growth_mib_relaying_a_57mib_answer"] = round(grown / MB, 1)


def test_answers_a_translation_must_hold_whole_are_bounded(start_proxy: Start) -> None:
    proxy = start_proxy({"embed": fake_profile("--embedding-dims", "400000"),   # about 2 MB
                         "chatty": fake_profile("--tokens", "40000")},           # about 320 KB of text
                        proxy={"max_answer_mb": 0.25, "max_loaded_models": 2})
    embedded = proxy.post("/api/embed", {"model": "embed", "input": "x"})
    assert embedded.status_code == 502 and "proxy.max_answer_mb" in embedded.json()["error"]
    assert "embed" in embedded.json()["error"]

    whole = proxy.post("/api/chat", {"model": "chatty", "stream": False, "messages": [{"role": "user", "content": "x"}]})
    assert whole.status_code == 502 and "proxy.max_answer_mb" in whole.json()["error"]

    streamed = proxy.post("/api/chat", {"model": "chatty", "messages": [{"role": "user", "content": "x"}]})
    records = [json.loads(line) for line in streamed.content.splitlines()]
    assert streamed.status_code == 200 and records[-1]["done"] is True  # a stream holds nothing: no limit
    assert proxy.status("chatty")["leases"] == 0 and proxy.status("embed")["leases"] == 0


def test_request_bodies_in_progress_together_are_bounded(start_proxy: Start) -> None:
    proxy = start_proxy({"slow": fake_profile("--answer-delay", "4")}, proxy={"max_body_mb": 24})  # budget 48 MiB
    assert proxy.chat("slow", stream=True).status_code == 200  # loaded
    body = {"model": "slow", "messages": [{"role": "user", "content": "x" * (20 * MB)}]}

    def send_four() -> list[int]:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: proxy.post("/v1/chat/completions", body, timeout=60), range(4)))
        for refused in (answer for answer in answers if answer.status_code == 503):
            assert refused.json()["error"]["code"] == "server_busy" and "max_body_mb" in refused.text
            assert "Retry-After" in refused.headers
        return sorted(answer.status_code for answer in answers)

    grown, statuses = peak_rss_during(proxy, send_four)
    assert statuses == [200, 200, 503, 503]  # two 20 MB bodies fit in the budget at once, not three
    FIGURES["peak_rss_growth_mib_four_20mib_bodies_at_once"] = round(grown / MB, 1)
    assert grown < 400 * MB
    assert proxy.post("/v1/chat/completions", body, timeout=60).status_code == 200  # the budget came back
