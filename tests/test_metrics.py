"""GET /metrics on the real proxy.py in front of fake backends, parsed with prometheus-client's own
parser: counts, histogram buckets and labels after real requests, model states, loads and unloads
by reason, rejections, and that scraping never holds a model up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ProxyProcess, fake_profile, wait_until

Start = Callable[..., ProxyProcess]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(proxy: ProxyProcess, **kwargs: Any) -> Samples:
    answer = proxy.get("/metrics", **kwargs)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` with exactly these labels (0 when it is not there)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_requests_tokens_waits_and_model_states_are_counted(start_proxy: Start) -> None:
    proxy = start_proxy({"alpha": fake_profile("--tokens", "4"), "beta": fake_profile()},
                        proxy={"max_loaded_models": 1, "unload_timer": 600})
    for _ in range(2):
        assert proxy.chat("alpha", max_tokens=4).status_code == 200
    streamed = proxy.post("/v1/chat/completions", {"model": "alpha", "stream": True, "max_tokens": 4,
                                                   "stream_options": {"include_usage": True},
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert streamed.status_code == 200 and b"[DONE]" in streamed.content
    assert proxy.post("/api/chat", {"model": "beta", "stream": False,
                                    "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert proxy.chat("nope").status_code == 404

    samples = scrape(proxy)

    route = "/v1/chat/completions"
    assert value(samples, "proxy_requests_total", model="alpha", route=route, status="200", key="api_key") == 3
    assert value(samples, "proxy_requests_total", model="beta", route="/api/chat", status="200", key="api_key") == 1
    assert value(samples, "proxy_requests_total", model="", route=route, status="404", key="api_key") == 1
    # Histograms: every request counted once, in cumulative buckets that end at +Inf.
    assert value(samples, "proxy_request_duration_seconds_count", model="alpha", route=route) == 3
    assert value(samples, "proxy_request_duration_seconds_bucket", model="alpha", route=route, le="+Inf") == 3
    assert value(samples, "proxy_model_wait_seconds_count", model="alpha", route=route) == 3
    assert value(samples, "proxy_time_to_first_token_seconds_count", model="alpha", route=route) == 1  # streams only
    # Tokens from the backends' usage: 3 prompt + 4 completion per alpha answer (the fake's), beta's 3 + 5.
    assert value(samples, "proxy_tokens_total", model="alpha", key="api_key", kind="prompt") == 9
    assert value(samples, "proxy_tokens_total", model="alpha", key="api_key", kind="completion") == 12
    assert value(samples, "proxy_tokens_total", model="beta", key="api_key", kind="completion") == 5
    # beta swapped alpha out: a load each, one unload by swap; the states are one-hot.
    assert value(samples, "proxy_model_loads_total", model="alpha", result="ok") == 1
    assert value(samples, "proxy_model_loads_total", model="beta", result="ok") == 1
    assert value(samples, "proxy_model_load_seconds_count", model="alpha") == 1
    assert value(samples, "proxy_model_unloads_total", model="alpha", reason="swap") == 1
    assert value(samples, "proxy_model_state", model="beta", state="ready") == 1
    assert value(samples, "proxy_model_state", model="alpha", state="stopped") == 1
    assert sum(value(samples, "proxy_model_state", model="alpha", state=state)
               for state in ("stopped", "starting", "ready", "stopping", "failed")) == 1
    assert value(samples, "proxy_queue_depth", model="beta") == 0
    assert ("process_resident_memory_bytes", frozenset()) in samples  # the library's process metrics
    assert not any("test-api-key" in str(labels) for _, labels in samples)  # key names, never keys


def test_metrics_need_a_key_unless_public(start_proxy: Start) -> None:
    closed = start_proxy({"alpha": fake_profile()})
    assert requests.get(closed.url + "/metrics", timeout=10).status_code == 401
    opened = start_proxy({"alpha": fake_profile()}, proxy={"metrics_public": True})
    assert requests.get(opened.url + "/metrics", timeout=10).status_code == 200


def test_unloads_by_reason_and_rejections(start_proxy: Start) -> None:
    proxy = start_proxy({"alpha": fake_profile(), "beta": fake_profile()}, proxy={"max_loaded_models": 2})
    assert proxy.chat("alpha", keep_alive=0).status_code == 200
    wait_until(lambda: proxy.status("alpha")["state"] == "stopped", what="alpha unloaded after keep_alive 0")
    assert proxy.chat("beta").status_code == 200
    assert proxy.get("/unload?model=beta", admin=True).json() == {"unloaded": ["beta"]}

    samples = scrape(proxy)

    assert value(samples, "proxy_model_unloads_total", model="alpha", reason="keep_alive_0") == 1
    assert value(samples, "proxy_model_unloads_total", model="beta", reason="requested") == 1


def test_scraping_during_an_idle_countdown_does_not_delay_the_unload(start_proxy: Start) -> None:
    proxy = start_proxy({"alpha": fake_profile()}, proxy={"unload_timer": 1})
    assert proxy.chat("alpha").status_code == 200
    idle_from = time.monotonic()
    while proxy.status("alpha")["state"] == "ready":
        scrape(proxy)  # as fast as it goes: scrapes are no requests for the model
        assert time.monotonic() - idle_from < 10, "alpha was never unloaded"
    assert time.monotonic() - idle_from < 6
    assert value(scrape(proxy), "proxy_model_unloads_total", model="alpha", reason="idle") == 1
