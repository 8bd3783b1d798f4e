"""Swaps (SWAP, TABBY.swap.*): from the last byte of model A's answer to the first event of model B's,
through a proxy with max_loaded_models 1, beside what the same work takes a backend on its own.

B's first event is its answer's first SSE data event: the proxy opens a stream to a model that is
loading at once and sends load progress as SSE comments, which are the proxy's bytes, not B's answer.

SWAP uses two synthetic profiles; its direct side is B's own start (spawned here, polled until
/health is 200). TABBY.swap.resident swaps two profiles of one resident_group (TabbyAPI unloads
and loads in place); TABBY.swap.process swaps two plain profiles (the old TabbyAPI stops, a new
one starts). Their direct sides do the same to a TabbyAPI started here with the config the proxy
would generate: unload + load + first event in place, or spawn until GET /v1/model serves the
model, plus the first event, plus the process's SIGTERM-to-exit.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.client import Connection, StreamReply
from bench.procs import Processes, free_port, wait_http_ok
from bench.report import Metric
from bench.stack import TABBY_FOLDERS, ProxyUnderTest, synthetic_argv
from bench.stats import summarize
from proxy.backends.tabby import load_request, tabby_config, tabby_python
from proxy.config import Config, load_config

CHAT = "/v1/chat/completions"


def _stream_body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "stream": True, "max_tokens": 4}


def _first_event(reply: StreamReply, what: str) -> float:
    """Return the monotonic time of a reply's first data event; raise when the answer failed."""
    if not reply.ok or reply.first_event_s is None:
        raise RuntimeError(f"{what}: {reply.error or 'no answer'}")
    return reply.started + reply.first_event_s


def _proxied_swaps(proxy: ProxyUnderTest, pair: tuple[str, str], runs: int,
                   direct_run: Callable[[str], float]) -> tuple[list[float], list[float], list[int]]:
    """Alternate direct_run(next model) and a proxied swap to it; return (direct s, swap s, backend pids)."""
    current, following = pair
    direct: list[float] = []
    swaps: list[float] = []
    pids: list[int] = []
    with Connection(proxy.port, timeout_s=180) as client:
        warm = client.stream(CHAT, _stream_body(current))  # loads `current` if it is not loaded yet
        _first_event(warm, f"{current} through the proxy")
        pids.append(proxy.backend(current).pid)
        for _ in range(runs):
            direct.append(direct_run(following))
            last = client.stream(CHAT, _stream_body(current))
            if not last.ok:
                raise RuntimeError(f"{current} through the proxy: {last.error}")
            swapped = client.stream(CHAT, _stream_body(following))
            swaps.append(_first_event(swapped, f"swap {current} -> {following} through the proxy") - last.ended)
            pids.append(proxy.backend(following).pid)
            current, following = following, current
    return direct, swaps, pids


def measure_swap(processes: Processes, proxy: ProxyUnderTest, workdir: Path, pair: tuple[str, str],
                 runs: int) -> list[Metric]:
    """SWAP: synthetic A -> B through the proxy, minus B's own start (spawn until /health answers 200)."""
    def own_start(model: str) -> float:
        port = free_port()
        started = time.monotonic()
        child = processes.spawn(synthetic_argv(port, model), name=f"direct-{model}", cwd=workdir)
        try:
            return wait_http_ok(port, "/health", timeout_s=20, alive=lambda: child.poll() is None) - started
        finally:
            processes.stop(child)

    direct, swaps, pids = _proxied_swaps(proxy, pair, runs, own_start)
    metric = Metric("SWAP", "swap overhead, synthetic A -> B (max_loaded_models 1), last byte of A to first event "
                    "of B", "ms", "<= 50 ms", direct=summarize(direct).scaled(1000.0),
                    proxy=summarize(swaps).scaled(1000.0))
    assert metric.direct is not None and metric.proxy is not None
    metric.value = metric.proxy.median - metric.direct.median
    metric.value_label = "added p50"
    same_process = sum(earlier == later for earlier, later in zip(pids, pids[1:]))
    metric.passed = metric.value <= 50.0 and same_process == 0
    metric.details = {"swaps": runs, "swaps_without_a_new_process": same_process,
                      "added_per_swap_p50_ms": summarize(s - d for s, d in zip(swaps, direct)).median * 1000.0}
    metric.note = (f"direct = B's own start, spawned here until /health answers 200 (p50 {metric.direct.median:.0f} ms); "
                   f"proxy = A's last byte to B's first answer event (A stops, B starts); {runs} swaps, alternating "
                   "directions")
    return [metric]


# ----- TabbyAPI ------------------------------------------------------------------------------------

class DirectTabby:
    """TabbyAPI started here (not by the proxy) with the config the proxy generates for a profile."""

    def __init__(self, processes: Processes, config: Config, workdir: Path, env: dict[str, str]) -> None:
        self._processes = processes
        self._config = config
        self._workdir = workdir
        self._env = {**os.environ, **env}  # the test bed's knobs, as the proxy passes them on

    def spawn(self, profile: str) -> tuple[subprocess.Popen[bytes], int]:
        """Start TabbyAPI for a profile on a free port; return (Popen, port) at once."""
        model = self._config.models[profile]
        tabby_dir = self._config.proxy.tabby_dir
        assert tabby_dir is not None
        port = free_port()
        config_path = self._workdir / f"direct-{profile}-{port}.yml"
        config_path.write_text(yaml.safe_dump(tabby_config(model, port), sort_keys=False))
        child = self._processes.spawn([tabby_python(self._config, tabby_dir), "main.py", "--config", str(config_path)],
                                      name=f"direct-{profile}", cwd=tabby_dir, env=self._env)
        return child, port

    def wait_served(self, port: int, profile: str, alive: Callable[[], bool], timeout_s: float = 120.0) -> None:
        """Poll GET /v1/model until it serves the profile's folder (as the proxy's readiness probe does)."""
        folder = TABBY_FOLDERS[profile]
        deadline = time.monotonic() + timeout_s
        while _served(port) != folder:
            if not alive():
                raise RuntimeError(f"direct TabbyAPI for {profile} exited while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"direct TabbyAPI for {profile} did not serve {folder} within {timeout_s:g}s")
            time.sleep(0.01)

    def load_in_place(self, port: int, profile: str) -> None:
        """Unload, load the profile's model over the admin API, and wait until it is served."""
        _admin(port, "/v1/model/unload", None)
        _admin(port, "/v1/model/load", load_request(self._config.models[profile]))
        self.wait_served(port, profile, alive=lambda: True)


def _served(port: int) -> str | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/v1/model")
        response = connection.getresponse()
        body = response.read()
        card = json.loads(body) if response.status == 200 else None
        return card.get("id") if isinstance(card, dict) else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        connection.close()


def _admin(port: int, path: str, body: Any) -> None:
    """POST to TabbyAPI's admin API and read the answer to its end (the load's progress events)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        if response.status != 200 or b'"error"' in answer:
            raise RuntimeError(f"direct TabbyAPI {path}: HTTP {response.status}: {answer[:300]!r}")
    finally:
        connection.close()


def _first_event_direct(port: int, profile: str) -> float:
    with Connection(port, timeout_s=60) as direct:
        return _first_event(direct.stream(CHAT, _stream_body(TABBY_FOLDERS[profile])), f"direct TabbyAPI {profile}")


def measure_tabby_swaps(processes: Processes, proxy: ProxyUnderTest, config_path: Path, workdir: Path,
                        resident: tuple[str, str], plain: tuple[str, str], runs: int,
                        env: dict[str, str]) -> list[Metric]:
    """TABBY.swap.resident and TABBY.swap.process: in place against a new process, each beside its direct work."""
    tabby = DirectTabby(processes, load_config(config_path), workdir, env)

    def own_restart(profile: str) -> float:
        """Spawn until served, the first event of an answer, then the same process's SIGTERM-to-exit."""
        started = time.monotonic()
        child, port = tabby.spawn(profile)
        try:
            tabby.wait_served(port, profile, alive=lambda: child.poll() is None)
            start_s = _first_event_direct(port, profile) - started
            return start_s + processes.time_sigterm_exit(child)
        finally:
            processes.stop(child)

    process_direct, process_swaps, process_pids = _proxied_swaps(proxy, plain, runs, own_restart)
    proxy.unload(plain[0])
    proxy.unload(plain[1])

    child, port = tabby.spawn(resident[0])
    try:
        tabby.wait_served(port, resident[0], alive=lambda: child.poll() is None)

        def own_in_place(profile: str) -> float:
            started = time.monotonic()
            tabby.load_in_place(port, profile)
            return _first_event_direct(port, profile) - started

        resident_direct, resident_swaps, resident_pids = _proxied_swaps(proxy, resident, runs, own_in_place)
    finally:
        processes.stop(child)
    in_place = len(set(resident_pids)) == 1
    new_processes = len(set(process_pids)) == len(process_pids)

    rows = []
    for key, title, direct, swaps, ok, how in (
            ("TABBY.swap.resident", "TabbyAPI swap in place (resident_group), last byte of A to first event of B",
             resident_direct, resident_swaps, in_place, "direct = unload + load over TabbyAPI's admin API until "
             "GET /v1/model serves B, then B's first event"),
            ("TABBY.swap.process", "TabbyAPI swap to a new process (plain profiles), last byte of A to first event of B",
             process_direct, process_swaps, new_processes, "direct = a TabbyAPI's own spawn until GET /v1/model "
             "serves B, B's first event, plus the same process's SIGTERM-to-exit")):
        metric = Metric(key, title, "ms", "report", direct=summarize(direct).scaled(1000.0),
                        proxy=summarize(swaps).scaled(1000.0), passed=None if ok else False)
        assert metric.direct is not None and metric.proxy is not None
        metric.value, metric.value_label = metric.proxy.median, "swap p50"
        added = metric.proxy.median - metric.direct.median
        metric.details = {"swaps": runs, "added_p50_ms": added, "as_expected": ok}
        expected = "every swap stayed in one process" if key.endswith("resident") else "every swap started a new process"
        metric.note = (f"{how}; the proxy adds {added:+.0f} ms (p50); {runs} swaps, alternating directions; "
                       + (expected if ok else f"not as expected ({expected}): see the proxy's log"))
        rows.append(metric)
    speedup = rows[1].proxy.median / rows[0].proxy.median if rows[0].proxy and rows[1].proxy else float("nan")
    knobs = ", ".join(f"{name} {value}" for name, value in env.items())
    rows[0].note += f"; {speedup:.1f}x faster than a new process; test bed knobs: {knobs}"
    rows[0].details["speedup_vs_new_process"] = speedup
    return rows
