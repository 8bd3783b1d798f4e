"""Admission control: requests in progress, all keys together and per key, through the real proxy.py
in front of real fake-backend streams; plus the counters and the config rules on their own.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
import yaml

from proxy.admission import Admission
from proxy.auth import KeyEntry
from proxy.config import ConfigError, load_config
from proxy.errors import RateLimited, ServerBusy
from tests.conftest import FIGURES, ROOT, ProxyProcess, fake_profile

Start = Callable[..., ProxyProcess]
LONG_STREAM = ("--tokens", "2000", "--token-delay", "0.05")  # 100 s: held until the test closes it


class Streams:
    """Long streams held open from threads; each records its status as soon as its headers arrive."""

    def __init__(self, proxy: ProxyProcess, headers: dict[str, str] | None = None) -> None:
        self._proxy = proxy
        self._headers = headers or proxy.headers()
        self.statuses: list[int] = []
        self.refusals: list[requests.Response] = []
        self._open: list[requests.Response] = []
        self._lock = threading.Lock()

    def open(self, count: int, path: str = "/v1/chat/completions") -> None:
        threads = [threading.Thread(target=self._one, args=(path,)) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

    def _one(self, path: str) -> None:
        body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        session = requests.Session()
        session.trust_env = False
        response = session.post(self._proxy.url + path, json=body, headers=self._headers, stream=True, timeout=30)
        with self._lock:
            self.statuses.append(response.status_code)
            (self._open if response.status_code == 200 else self.refusals).append(response)

    def close(self) -> None:
        for response in self._open:
            response.close()
        self._open.clear()


def test_health_answers_within_50ms_while_every_request_slot_holds_a_stream(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile(*LONG_STREAM)},
                        proxy={"threads": 6, "reserved_threads": 2, "key_max_concurrent": 0})
    assert proxy.chat("fake").status_code == 200  # loaded
    streams = Streams(proxy)
    try:
        streams.open(6)  # as many as there are threads: before admission control this took every one
        assert sorted(streams.statuses) == [200, 200, 200, 200, 503, 503]
        for refused in streams.refusals:
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["error"]["code"] == "server_busy"
            assert set(refused.json()["error"]) == {"message", "type", "code", "param"}
        proxy.wait_for(lambda: proxy.status("fake")["leases"] == 4, what="four streams holding leases")

        timings = []
        for _ in range(100):
            started = time.perf_counter()
            assert proxy.http.get(proxy.url + "/health", timeout=5).status_code == 200
            timings.append(time.perf_counter() - started)
        timings.sort()
        p99 = timings[98]
        FIGURES["health_p99_ms_while_every_slot_streams"] = round(p99 * 1000, 2)
        FIGURES["streams_held_while_health_answers"] = proxy.status("fake")["leases"]
        assert p99 < 0.050

        ollama = proxy.post("/api/chat", {"model": "fake", "messages": [{"role": "user", "content": "x"}]})
        assert ollama.status_code == 503 and set(ollama.json()) == {"error"} and "Retry-After" in ollama.headers
        assert proxy.get("/status").status_code == 200  # admin routes are served from the reserve
        assert proxy.http.get(proxy.url + "/ping", timeout=5).status_code == 200
    finally:
        streams.close()
    proxy.wait_for(lambda: proxy.status("fake")["leases"] == 0, what="the streams to end")
    for _ in range(8):  # every slot came back, also from requests that ended in an error
        assert proxy.chat("no-such-model").status_code == 404
    again = Streams(proxy)
    try:
        again.open(4)
        assert again.statuses == [200, 200, 200, 200]
    finally:
        again.close()


def test_a_key_beyond_its_max_concurrent_gets_429_in_each_dialect(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile(*LONG_STREAM)}, proxy={"key_max_concurrent": 2})
    tokens = proxy.config_path.parent / "api_tokens.yml"
    raw = yaml.safe_load(tokens.read_text())
    raw["keys"] = [{"name": "alice", "key": "alice-key-0000000", "max_concurrent": 1}]
    tokens.write_text(yaml.safe_dump(raw))
    alice = {"Authorization": "Bearer alice-key-0000000"}
    proxy.wait_for(lambda: proxy.http.get(proxy.url + "/v1/models", headers=alice).status_code == 200,
                   timeout_s=8, what="the running proxy to pick up alice's key")
    mine, plain = Streams(proxy, alice), Streams(proxy)
    try:
        mine.open(1)
        assert mine.statuses == [200]
        body = {"model": "fake", "messages": [{"role": "user", "content": "x"}]}
        openai = proxy.http.post(proxy.url + "/v1/chat/completions", json=body, headers=alice, timeout=10)
        assert openai.status_code == 429 and int(openai.headers["Retry-After"]) >= 1
        assert openai.json()["error"]["code"] == "rate_limited" and "alice" in openai.json()["error"]["message"]
        ollama = proxy.http.post(proxy.url + "/api/chat", json=body, headers=alice, timeout=10)
        assert ollama.status_code == 429 and set(ollama.json()) == {"error"} and "Retry-After" in ollama.headers

        plain.open(3)  # the plain api_key: proxy.key_max_concurrent
        assert sorted(plain.statuses) == [200, 200, 429]
        assert "proxy.key_max_concurrent" in plain.refusals[0].json()["error"]["message"]
        admin = proxy.http.post(proxy.url + "/v1/chat/completions", json=body, headers=proxy.headers(admin=True),
                                timeout=10)
        assert admin.status_code == 200  # other keys are not held back
    finally:
        mine.close()
        plain.close()
    proxy.wait_for(lambda: proxy.status("fake")["leases"] == 0, what="the streams to end")
    assert proxy.http.post(proxy.url + "/v1/chat/completions", timeout=10, headers=alice,
                           json={"model": "fake", "messages": [{"role": "user", "content": "x"}]}).status_code == 200


def test_max_queue_fills_before_the_request_slots_do(start_proxy: Start) -> None:
    # threads 8: 6 request slots, so max_queue defaults to 3; each waiting request holds a slot.
    proxy = start_proxy({"fake": fake_profile(*LONG_STREAM)},
                        proxy={"threads": 8, "reserved_threads": 2, "max_concurrent": 1, "queue_timeout": 4})
    assert proxy.chat("fake").status_code == 200
    running = Streams(proxy)
    waiting = Streams(proxy)
    queued = [threading.Thread(target=waiting.open, args=(1,)) for _ in range(3)]
    try:
        running.open(1)
        for thread in queued:
            thread.start()
        proxy.wait_for(lambda: proxy.status("fake")["queued"] == 3, what="three requests waiting for the model")
        started = time.monotonic()
        full = proxy.post("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "x"}]})
        assert full.status_code == 503 and "max_queue" in full.json()["error"]["message"]
        assert time.monotonic() - started < 1.0  # at once, with request slots still free
        for thread in queued:
            thread.join(30)
        assert waiting.statuses == [503, 503, 503]  # queue_timeout: they waited, then were told to retry
    finally:
        running.close()
        waiting.close()


# ----- the counters, without threads ------------------------------------------------------------------

def test_admission_counts_all_keys_and_each_key_and_releases_once() -> None:
    admission = Admission(slots=3)
    alice, bob = KeyEntry("alice", "k" * 8, max_concurrent=1), KeyEntry("bob", "b" * 8)
    first = admission.admit(alice, default_key_limit=0)
    with pytest.raises(RateLimited):
        admission.admit(alice, default_key_limit=0)
    second, third = admission.admit(bob, 0), admission.admit(None, 0)
    with pytest.raises(ServerBusy):
        admission.admit(bob, 0)
    assert admission.in_progress() == 3
    first.release()
    first.release()  # idempotent: counted once
    assert admission.in_progress() == 2
    admission.admit(alice, 0).release()
    second.release()
    third.release()
    assert admission.in_progress() == 0


def test_plain_keys_take_the_default_limit_and_zero_means_none() -> None:
    admission = Admission(slots=10)
    plain = KeyEntry("api_key", "p" * 8)
    held = [admission.admit(plain, default_key_limit=2) for _ in range(2)]
    with pytest.raises(RateLimited, match="proxy.key_max_concurrent"):
        admission.admit(plain, default_key_limit=2)
    held += [admission.admit(plain, default_key_limit=0) for _ in range(5)]
    unlimited = KeyEntry("batch", "q" * 8, max_concurrent=0)  # its own 0 wins over the default
    held += [admission.admit(unlimited, default_key_limit=1) for _ in range(3)]
    assert admission.in_progress() == 10
    for slot in held:
        slot.release()
    assert admission.in_progress() == 0


# ----- config ---------------------------------------------------------------------------------------

def write(tmp_path: Path, proxy: dict[str, object]) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"proxy": proxy}))
    return path


def test_defaults_keep_a_reserve_and_a_queue_that_can_fill(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, {})).proxy
    assert (settings.threads, settings.reserved_threads, settings.request_slots) == (64, 8, 56)
    assert settings.max_queue == 28  # half the slots: waiting requests never hold them all
    small = load_config(write(tmp_path, {"threads": 6})).proxy
    assert (small.reserved_threads, small.request_slots, small.max_queue) == (1, 5, 2)


@pytest.mark.parametrize(("settings", "expected"), [
    pytest.param({"max_queue": 512}, "proxy.max_queue: 512 can never be reached", id="queue-beyond-slots"),
    pytest.param({"threads": 4, "reserved_threads": 4}, "proxy.reserved_threads: expected fewer than threads",
                 id="reserve-takes-all"),
    pytest.param({"threads": 1}, "proxy.threads: expected at least 2", id="one-thread"),
    pytest.param({"key_max_concurrent": -1}, "proxy.key_max_concurrent", id="negative-key-limit"),
    pytest.param({"client_timeout": 0}, "proxy.client_timeout", id="zero-client-timeout"),
])
def test_admission_settings_are_checked(tmp_path: Path, settings: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, settings))


def test_a_named_keys_max_concurrent_is_checked(tmp_path: Path) -> None:
    from proxy.auth import load_keys

    tokens = tmp_path / "api_tokens.yml"
    tokens.write_text(yaml.safe_dump({"admin_key": "a" * 16, "keys": [{"name": "x", "key": "x" * 16,
                                                                       "max_concurrent": "many"}]}))
    with pytest.raises(ConfigError, match=r"keys\[0\]\.max_concurrent"):
        load_keys(tokens)
    tokens.write_text(yaml.safe_dump({"admin_key": "a" * 16, "keys": [{"name": "x", "key": "x" * 16,
                                                                       "max_concurrent": 3}]}))
    assert next(entry for entry in load_keys(tokens).entries if entry.name == "x").max_concurrent == 3


def test_the_keys_cli_sets_a_keys_max_concurrent(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile(*LONG_STREAM)})
    added = subprocess.run([sys.executable, str(ROOT / "proxy.py"), "--config", str(proxy.config_path), "keys", "add",
                            "bob", "--max-concurrent", "1"], capture_output=True, text=True, timeout=30)
    assert added.returncode == 0, added.stderr
    bob = {"Authorization": f"Bearer {added.stdout.strip()}"}
    listing = subprocess.run([sys.executable, str(ROOT / "proxy.py"), "--config", str(proxy.config_path), "keys",
                              "list"], capture_output=True, text=True, timeout=30).stdout
    assert "at most 1 at once" in listing
    proxy.wait_for(lambda: proxy.http.get(proxy.url + "/v1/models", headers=bob).status_code == 200,
                   timeout_s=8, what="the running proxy to pick up bob's key")
    streams = Streams(proxy, bob)
    try:
        streams.open(2)
        assert sorted(streams.statuses) == [200, 429]
    finally:
        streams.close()
