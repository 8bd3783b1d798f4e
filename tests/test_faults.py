"""The fault suite: real proxy.py, real backend processes, and the OS process table as the judge.

Orphans after every way the proxy or a backend can die; a soak of 1,000 randomized requests with
disconnects and keep_alive 0 across three models that must swap; every figure printed at the end.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil
import pytest
import requests

from tests.conftest import FIGURES, ProxyProcess, fake_profile, wait_until

Start = Callable[..., ProxyProcess]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "SIGINT"])
def test_no_orphan_when_the_proxy_dies(start_proxy: Start, how: str) -> None:
    proxy = start_proxy({"a": fake_profile("--ignore-sigterm"), "b": fake_profile()},
                        proxy={"max_loaded_models": 2, "stop_grace": 1})
    assert proxy.chat("a").status_code == 200 and proxy.chat("b").status_code == 200
    assert len(proxy.backends()) == 2
    proxy.popen.send_signal(getattr(signal, how))
    proxy.popen.wait(15)
    wait_until(lambda: proxy.surviving_backends() == [], timeout_s=5, what=f"no backend after {how}")
    FIGURES[f"orphans_after_proxy_{how}"] = len(proxy.surviving_backends())


def test_no_orphan_when_a_backend_crashes_loading_hangs_or_dies_mid_stream(start_proxy: Start) -> None:
    proxy = start_proxy({
        "dies": fake_profile("--exit-during-startup", "--startup-delay", "0.3"),
        "hangs": fake_profile("--startup-delay", "60", startup_timeout=1),
        "breaks": fake_profile("--token-delay", "0.2", "--tokens", "50"),
    }, proxy={"max_loaded_models": 3})
    assert proxy.chat("dies").status_code == 502
    holder: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: holder.setdefault("r", proxy.chat("hangs")))
    thread.start()
    time.sleep(0.5)
    proxy.backends()
    thread.join(10)
    assert holder["r"].status_code == 504
    stream = proxy.chat("breaks", stream=True)
    lines = stream.iter_lines()
    next(lines)
    [broken] = [process for process in proxy.backends() if process.pid == proxy.status("breaks")["pid"]]
    broken.kill()
    tail = b"\n".join(lines)
    assert b'"error"' in tail
    wait_until(lambda: proxy.surviving_backends() == [], timeout_s=5, what="no backend left behind")
    FIGURES["orphans_after_backend_faults"] = len(proxy.surviving_backends())


@pytest.mark.timeout(300)  # a soak: about 80 s on a quiet machine, much more beside other tests on two cores
def test_soak_of_randomized_requests_loses_nothing(start_proxy: Start) -> None:
    total, workers = 1000, 8
    proxy = start_proxy(
        {name: fake_profile("--token-delay", "0.002", "--tokens", "6", unload_timer=1) for name in ("m0", "m1", "m2")},
        proxy={"max_loaded_models": 1, "queue_timeout": 60, "stop_grace": 2},
    )
    rng = random.Random(20261121)
    plans = [{
        # Mostly one model (as people use it), often another: a few hundred real swaps.
        "model": rng.choices(["m0", "m1", "m2"], weights=[8, 1, 1])[0],
        "stream": rng.random() < 0.6,
        "disconnect": rng.random() < 0.15,
        "keep_alive": 0 if rng.random() < 0.05 else None,
    } for _ in range(total)]
    outcomes: Counter[str] = Counter()
    problems: list[str] = []
    alive_samples: list[int] = []
    lock = threading.Lock()
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            alive = []
            for child in _children(proxy.popen.pid):
                try:
                    if child.status() != psutil.STATUS_ZOMBIE:
                        proxy.seen_backends.setdefault(child.pid, child.create_time())
                        alive.append(child)
                except psutil.NoSuchProcess:
                    pass  # exited between listing and looking
            with lock:
                alive_samples.append(len(alive))
            time.sleep(0.01)

    def run(plan: dict[str, Any]) -> str:
        body: dict[str, Any] = {"model": plan["model"], "messages": [{"role": "user", "content": "hi"}],
                                "stream": plan["stream"]}
        if plan["keep_alive"] is not None:
            body["keep_alive"] = plan["keep_alive"]
        response = requests.post(proxy.url + "/v1/chat/completions", json=body, headers=proxy.headers(),
                                 stream=plan["stream"], timeout=90)
        if response.status_code != 200:
            return f"status {response.status_code}"
        if plan["stream"]:
            chunks = response.iter_content(chunk_size=None)
            if plan["disconnect"]:
                next(chunks)
                response.close()  # the client goes away mid-stream
                return "disconnected"
            body_bytes = b"".join(chunks)
            return "ok" if body_bytes.rstrip().endswith(b"data: [DONE]") else "truncated"
        return "ok" if response.json()["choices"][0]["message"]["content"] else "empty"

    def worker(index: int) -> None:
        for plan in plans[index::workers]:
            try:
                outcome = run(plan)
            except requests.RequestException as exc:
                outcome = f"exception {type(exc).__name__}"
            with lock:
                outcomes[outcome] += 1
                if outcome not in ("ok", "disconnected"):
                    problems.append(f"{plan}: {outcome}")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(index,)) for index in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    elapsed = time.monotonic() - started
    sampling.set()
    sampler.join(5)

    statuses = proxy.get("/status").json()["models"]
    leaked = sum(model["leases"] for model in statuses)
    queued = sum(model["queued"] for model in statuses)
    swaps = proxy.log().count(" -> starting")
    wait_until(lambda: all(model["state"] == "stopped" for model in proxy.get("/status").json()["models"]),
               timeout_s=6, what="every model to unload on its 1 s timer")
    proxy.stop()
    wait_until(lambda: proxy.surviving_backends() == [], timeout_s=5, what="no orphan after the soak")
    FIGURES.update({
        "soak_requests": total, "soak_seconds": round(elapsed, 1), "soak_outcomes": dict(outcomes),
        "soak_disconnects": outcomes["disconnected"], "soak_loads": swaps, "leases_leaked": leaked,
        "queued_left": queued, "max_backends_alive_at_once": max(alive_samples, default=0),
        "orphans_after_soak": len(proxy.surviving_backends()), "process_table_samples": len(alive_samples),
    })
    assert sum(outcomes.values()) == total  # every request got an answer or an error
    assert not problems, problems[:10]
    assert leaked == 0 and queued == 0
    assert max(alive_samples) <= 1  # max_loaded_models: 1 holds at every sampled moment
    assert swaps > 20  # the soak really swapped


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_a_backend_that_hangs_mid_stream_is_cut_after_the_idle_gap(start_proxy: Start) -> None:
    proxy = start_proxy({"stalls": fake_profile("--token-delay", "4", "--tokens", "3")}, proxy={"read_timeout": 1})
    started = time.monotonic()
    body = proxy.chat("stalls", stream=True).content
    assert 0.9 < time.monotonic() - started < 4  # the idle-gap limit, not the backend's pace
    assert b'"error"' in body and b"sent nothing for 1s" in body and b"[DONE]" not in body
    ollama = proxy.post("/api/chat", {"model": "stalls", "messages": [{"role": "user", "content": "x"}]})
    assert "sent nothing" in json.loads(ollama.content.splitlines()[-1])["error"]
    assert proxy.status("stalls")["leases"] == 0
