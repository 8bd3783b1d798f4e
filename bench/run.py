"""The benchmark: the same workloads measured DIRECT (client -> backend port) and THROUGH THE PROXY.

Measurements (targets in TARGETS):

  P1   added latency of a small non-stream request (p50 proxied - p50 direct), synthetic upstream;
       P1.cpu: the proxy's CPU per such request
  FLOOR the same small request and first token through two bare forwarders on the proxy's own stack
       (waitress + urllib3, then Flask on them: bench/floor.py): what the libraries cost without the proxy
  P2   relay rate of a long unpaced stream, proxied / direct (P2b: the same, paced at 20,000 chunks/s)
  P3   added time to first token (p50), synthetic upstream with a token rate
  GAP  inter-chunk delay preservation at a token rate: each chunk's arrival gap against the gap at
       which the server sent it, through the proxy and direct; chunks sent apart must not arrive batched
  P4   cold-load overhead: first token on a stopped model through the proxy minus the backend's own
       start (spawned by us, polled until /health is 200) plus its first answer; synthetic and SmolLM2
  P5   64 concurrent streams: errors and the aggregate rate, proxied / direct
  P8   256 concurrent streams (a proxy with 320 threads): errors, rate ratio, RSS per open stream;
       P5.cpu and P8.cpu: the proxy's CPU per relayed event of those paced streams
  CONN connections opened by N sequential streamed requests from one keep-alive client, OpenAI SSE
       and Ollama NDJSON: client to proxy (CONN) and proxy to backend (CONN.backend)
  SWAP synthetic A -> B swap (max_loaded_models 1), A's last byte to B's first, minus B's own start
  TABBY.swap  TabbyAPI test bed: a swap in place (resident_group) and one to a new process
  P6   idle deadline to child exit (unload_timer: 1), beside the backend's own SIGTERM-to-exit time
  P7   proxy RSS idle and under the 64-stream load; proxy CPU seconds per 1,000 relayed chunks
  SMOL the real SmolLM2 backend: added latency of a small request and added time to first token

Direct and proxied runs alternate (direct, proxy, direct, proxy, ...) so that drift in the
machine's state spreads evenly over both. Every process started here is stopped in a finally block.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in requirements-dev.txt

from bench.client import Connection, StreamReply
from bench.concurrency import concurrency_metric, measure_wide, paced_cpu_metric, run_concurrent
from bench.connections import measure_connections
from bench.floor import measure_floor
from bench.procs import Processes, free_port, process_exited, wait_http_ok
from bench.report import Metric, markdown, write_results
from bench.sampling import MB, CpuMeter, rss_mb
from bench.stack import (PROXY_THREADS, ROOT, SMOL, SMOL_IDLE, SWAP_A, SWAP_B, SYNTH, SYNTH_IDLE, TABBY_KNOBS,
                         TABBY_PLAIN, TABBY_RESIDENT, WIDE_PROXY_THREADS, ProxyUnderTest, smollm2_gguf,
                         synthetic_argv, tabby_testbed, write_config, write_tabby_config, write_wide_config)
from bench.stats import Summary, summarize
from bench.swaps import measure_swap, measure_tabby_swaps

log = logging.getLogger("bench")

CHAT = "/v1/chat/completions"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"

TARGETS = {
    "P1": "<= 0.8 ms",
    "P2": ">= 0.95",
    "P3": "<= 1 ms",
    "GAP": "p95 <= 2 ms, none batched",
    "P4": "<= 50 ms",
    "P5": "0 errors, >= 0.9",
    "P6": "<= 1 s beyond own exit",
    "P7": "<= 80 MB idle",
}


@dataclass(frozen=True, slots=True)
class Settings:
    """How much of everything to run; `quick` takes about 20 s on two cores, `full` a few minutes."""

    mode: str
    p1_requests: int = 300
    floor_requests: int = 300
    floor_streams: int = 30
    p2_chunks: int = 20000
    p2_runs: int = 5
    p2_paced_rate: float = 20000.0
    p2_paced_chunks: int = 20000
    p2_paced_runs: int = 3
    p3_runs: int = 40
    token_rate: float = 50.0          # P3 and GAP
    p3_chunks: int = 4
    gap_chunks: int = 100
    gap_runs: int = 3
    p5_streams: int = 64
    p5_chunks: int = 200
    p5_rate: float = 100.0            # per stream
    p5_runs: int = 2
    p8: bool = True                   # off in quick mode: opening 256 streams through the proxy takes seconds
    p8_streams: int = 256
    p8_chunks: int = 100
    p8_rate: float = 50.0             # per stream: 2 s of streaming
    p8_runs: int = 2
    conn_requests: int = 50
    swap_runs: int = 6
    tabby: bool = True
    tabby_runs: int = 3
    p4_runs: int = 5
    p6_runs: int = 3
    smollm2: bool = True
    smol_runs: int = 20
    smol_cold_runs: int = 3
    smol_idle_runs: int = 1

    @staticmethod
    def for_mode(quick: bool, smollm2: bool | None, tabby: bool | None = None) -> Settings:
        if not quick:
            return Settings(mode="full", smollm2=True if smollm2 is None else smollm2,
                            tabby=True if tabby is None else tabby)
        return Settings(mode="quick", p1_requests=60, floor_requests=60, floor_streams=8, p2_chunks=5000, p2_runs=2, p2_paced_chunks=5000,
                        p2_paced_runs=2, p3_runs=12, gap_chunks=30, gap_runs=1, p5_chunks=150, p5_runs=1,
                        p8=False, conn_requests=10, swap_runs=2,
                        p4_runs=3, p6_runs=1, smollm2=False if smollm2 is None else smollm2, smol_runs=4,
                        smol_cold_runs=1, smol_idle_runs=1, tabby=False if tabby is None else tabby)


def chat_body(model: str, *, stream: bool = False, chunks: int = 8, rate: float | None = None,
              content: str = "Say hello.", **extra: Any) -> dict[str, Any]:
    """A chat request; for the synthetic server max_tokens is the chunk count and x_token_rate the pace."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}],
                            "stream": stream, "max_tokens": chunks, **extra}
    if rate is not None:
        body["x_token_rate"] = rate
    return body


def _ms(summary: Summary | None) -> Summary | None:
    return summary.scaled(1000.0) if summary is not None else None


def _added(metric: Metric, limit: float) -> None:
    """Set value to the added median (proxy - direct) and passed to value <= limit."""
    assert metric.direct is not None and metric.proxy is not None
    metric.value = metric.proxy.median - metric.direct.median
    metric.value_label = "added p50"
    metric.passed = metric.value <= limit


class Bench:
    """One benchmark run against one proxy process; collects Metrics, notes and errors."""

    def __init__(self, settings: Settings, processes: Processes, proxy: ProxyUnderTest, workdir: Path, *,
                 proxy_script: Path = ROOT / "proxy.py", proxy_log_level: str = "INFO") -> None:
        self.settings = settings
        self.processes = processes
        self.proxy = proxy
        self.workdir = workdir
        self.proxy_script = proxy_script      # for the other proxies it starts (wide, TabbyAPI)
        self.proxy_log_level = proxy_log_level
        self.metrics: list[Metric] = []
        self.notes: list[str] = []
        self.errors: list[str] = []
        self.rss_fresh_mb = rss_mb(proxy.pid)
        self.rss_idle_mb = float("nan")
        self.rss_load_mb = float("nan")
        self.proxy_cpu = CpuMeter(proxy.pid)
        self.relay_cpu_s = 0.0
        self.relayed_chunks = 0

    # ----- bookkeeping ---------------------------------------------------------------------------

    def measure(self, key: str, step: Callable[[], list[Metric]], proxy: ProxyUnderTest | None = None) -> None:
        """Run one measurement; a failure is recorded (with the proxy log's end) and the run goes on."""
        log.info("measuring %s", key)
        started = time.monotonic()
        try:
            self.metrics += step()
        except Exception as exc:
            log.exception("%s failed", key)
            tail = self.processes.log_tail((proxy or self.proxy).name, 8).replace("\n", " | ")
            self.errors.append(f"{key}: {type(exc).__name__}: {exc} (proxy log: {tail})")
        log.info("%s done in %.1fs", key, time.monotonic() - started)

    # ----- the synthetic upstream ---------------------------------------------------------------

    def run_synthetic(self) -> None:
        self.backend = self.proxy.load(SYNTH, chat_body(SYNTH, chunks=2))
        self.direct = Connection(self.backend.port)
        self.proxied = Connection(self.proxy.port)
        try:
            self.measure("P1", self.p1_latency)
            idle_cpu_s = self.proxy_cpu.now_s()
            time.sleep(0.5)
            self.idle_cpu_ms_per_s = (self.proxy_cpu.now_s() - idle_cpu_s) / 0.5 * 1000.0
            self.rss_idle_mb = rss_mb(self.proxy.pid)
            self.measure("P1.cpu", self.p1_cpu)
            self.measure("CONN", lambda: measure_connections(self.proxy.port, self.backend.port, SYNTH,
                                                             self.settings.conn_requests))
            self.measure("P2", self.p2_relay)
            self.measure("P3", self.p3_ttft)
            self.measure("FLOOR", lambda: measure_floor(
                self.processes, self.backend.port, self.proxy.port, self.proxy.pid,
                requests=self.settings.floor_requests, streams=self.settings.floor_streams,
                small=chat_body(SYNTH, chunks=8),
                stream=chat_body(SYNTH, stream=True, chunks=self.settings.p3_chunks, rate=self.settings.token_rate)))
            self.measure("GAP", self.gaps)
            self.measure("P5", self.p5_concurrency)
            self.measure("P7", self.p7_memory_cpu)
            self.measure("P6.synthetic", lambda: self.p6_idle_exit(
                "synthetic", SYNTH_IDLE, lambda port: synthetic_argv(port, SYNTH_IDLE), chat_body(SYNTH_IDLE, chunks=2),
                self.settings.p6_runs))
            self.measure("P4.synthetic", lambda: self.p4_cold(
                "synthetic", SYNTH, lambda port: synthetic_argv(port, SYNTH), chat_body(SYNTH, stream=True, chunks=4),
                self.settings.p4_runs, health="/health"))
        finally:
            self.direct.close()
            self.proxied.close()

    def p1_latency(self) -> list[Metric]:
        body = chat_body(SYNTH, chunks=8)
        timings: dict[str, list[float]] = {"direct": [], "proxy": []}
        failures = 0
        rounds = self.settings.p1_requests + 20
        proxy_cpu, backend_cpu = self.proxy_cpu, CpuMeter(self.backend.pid)
        cpu_at_start = (proxy_cpu.now_s(), backend_cpu.now_s())
        for index in range(rounds):
            for side, connection in (("direct", self.direct), ("proxy", self.proxied)):
                reply = connection.post(CHAT, body)
                if reply.status != 200:
                    failures += 1
                elif index >= 20:  # the first 20 are warm-up
                    timings[side].append(reply.elapsed_s)
        # Over the whole loop, not per request: the proxy's work after an answer's last byte (access
        # log, request log, lease release) falls outside any window around the request itself.
        self.p1_cpu_s = (proxy_cpu.now_s() - cpu_at_start[0], backend_cpu.now_s() - cpu_at_start[1])
        self.p1_proxied_requests = rounds
        direct, proxy = summarize(timings["direct"]).scaled(1000.0), summarize(timings["proxy"]).scaled(1000.0)
        metric = Metric("P1", "added latency, small non-stream request (synthetic)", "ms", TARGETS["P1"],
                        direct=direct, proxy=proxy)
        _added(metric, 0.8)
        metric.passed = metric.passed and failures == 0
        metric.details = {"failed_requests": failures, "added_p95_ms": proxy.p95 - direct.p95}
        return [metric]

    def p1_cpu(self) -> list[Metric]:
        proxy_s, backend_s = self.p1_cpu_s
        requests = self.p1_proxied_requests
        per_request_ms = proxy_s / requests * 1000.0
        backend_ms = backend_s / (2 * requests) * 1000.0  # the backend answered both sides' requests
        metric = Metric("P1.cpu", "proxy CPU per small non-stream request (the P1 loop)", "ms", "report",
                        proxy=summarize([per_request_ms]), value=per_request_ms, value_label="CPU ms / request")
        metric.details = {"proxy_cpu_s": proxy_s, "proxied_requests": requests,
                          "backend_cpu_ms_per_request": backend_ms, "proxy_idle_cpu_ms_per_s": self.idle_cpu_ms_per_s}
        metric.note = (f"the proxy process's user + system CPU over the P1 loop ({proxy_s:.2f} s, the direct requests' "
                       f"time included) / its {requests} proxied requests; the synthetic backend spends "
                       f"{backend_ms:.3f} ms per request; the idle proxy uses {self.idle_cpu_ms_per_s:.2f} ms per s")
        return [metric]

    def _relay_runs(self, chunks: int, runs: int, rate: float) -> tuple[dict[str, list[StreamReply]], int]:
        """Alternate direct and proxied streams (one warm-up pair first); count the proxy's CPU and chunks."""
        body = chat_body(SYNTH, stream=True, chunks=chunks, rate=rate)
        replies: dict[str, list[StreamReply]] = {"direct": [], "proxy": []}
        failures = 0
        for index in range(runs + 1):
            for side, connection in (("direct", self.direct), ("proxy", self.proxied)):
                with self.proxy_cpu.counting() if side == "proxy" else nullcontext():
                    reply = connection.stream(CHAT, body)
                if side == "proxy":
                    self.relayed_chunks += reply.events
                if not reply.ok or reply.events != chunks + 3:
                    failures += 1
                    log.warning("%s stream failed: %s (%d events)", side, reply.error, reply.events)
                elif index > 0:
                    replies[side].append(reply)
        return replies, failures

    def p2_relay(self) -> list[Metric]:
        settings = self.settings
        self.relayed_chunks = 0
        cpu_before = self.proxy_cpu.total_s
        unpaced = self._relay_runs(settings.p2_chunks, settings.p2_runs, 0.0)
        self.relay_cpu_s = self.proxy_cpu.total_s - cpu_before  # the unpaced runs only: relay work at full speed
        relayed_unpaced = self.relayed_chunks
        paced = self._relay_runs(settings.p2_paced_chunks, settings.p2_paced_runs, settings.p2_paced_rate)
        self.relayed_chunks = relayed_unpaced
        metrics = []
        for key, (replies, failures), target, title in (
                ("P2", unpaced, TARGETS["P2"], f"relay rate, {settings.p2_chunks:,}-chunk unpaced stream"),
                ("P2b", paced, ">= 0.95 (paced)", f"relay rate, {settings.p2_paced_chunks:,}-chunk stream paced "
                 f"at {settings.p2_paced_rate:,.0f} chunks/s")):
            direct = summarize(reply.events / reply.duration_s for reply in replies["direct"])
            proxy = summarize(reply.events / reply.duration_s for reply in replies["proxy"])
            ratio = proxy.median / direct.median
            metric = Metric(key, title, "chunks/s", target, direct=direct, proxy=proxy, ratio=ratio,
                            value=ratio, value_label="ratio of medians", passed=ratio >= 0.95 and failures == 0)
            bytes_direct = summarize(reply.wire_bytes / reply.duration_s / MB for reply in replies["direct"])
            bytes_proxy = summarize(reply.wire_bytes / reply.duration_s / MB for reply in replies["proxy"])
            metric.details = {"failed_streams": failures, "direct_MB_per_s": bytes_direct,
                              "proxy_MB_per_s": bytes_proxy, "ratio_bytes": bytes_proxy.median / bytes_direct.median}
            metrics.append(metric)
        metrics[0].note = ("unpaced: the synthetic server sends as fast as its reader takes them, and the two cores "
                           "run client, proxy and backend together, so this is the proxy's CPU-bound relay capacity; "
                           f"bytes/s ratio {metrics[0].details['ratio_bytes']:.3f}")
        return metrics

    def p3_ttft(self) -> list[Metric]:
        body = chat_body(SYNTH, stream=True, chunks=self.settings.p3_chunks, rate=self.settings.token_rate)
        ttft: dict[str, list[float]] = {"direct": [], "proxy": []}
        failures = 0
        for index in range(self.settings.p3_runs + 3):
            for side, connection in (("direct", self.direct), ("proxy", self.proxied)):
                reply = connection.stream(CHAT, body)
                if not reply.ok or reply.ttft_s is None:
                    failures += 1
                elif index >= 3:
                    ttft[side].append(reply.ttft_s)
        metric = Metric("P3", f"added time to first token (synthetic, {self.settings.token_rate:g} tokens/s)", "ms",
                        TARGETS["P3"], direct=_ms(summarize(ttft["direct"])), proxy=_ms(summarize(ttft["proxy"])))
        _added(metric, 1.0)
        metric.passed = metric.passed and failures == 0
        metric.details = {"failed_streams": failures}
        return [metric]

    def gaps(self) -> list[Metric]:
        """Each chunk's arrival gap against the gap at which the server sent it (x_t stamps), both sides.

        Comparing a proxied run's gaps with a direct run's gaps (the literal |gap difference|, kept in
        the details) also counts the synthetic server's own sleep jitter in both runs; comparing
        arrival gaps with send gaps of the same run isolates what the path adds.
        """
        settings = self.settings
        body = chat_body(SYNTH, stream=True, chunks=settings.gap_chunks, rate=settings.token_rate)
        distortion: dict[str, list[float]] = {"direct": [], "proxy": []}
        latency: dict[str, list[float]] = {"direct": [], "proxy": []}
        tails: dict[str, list[float]] = {"direct": [], "proxy": []}
        pairwise: list[float] = []
        batched = 0
        failures = 0
        nominal = 1.0 / settings.token_rate
        tokens = range(1, settings.gap_chunks + 1)  # event 0 is the role delta, the last one the finish
        for _ in range(settings.gap_runs):
            arrival_gaps: dict[str, list[float]] = {}
            for side, connection in (("direct", self.direct), ("proxy", self.proxied)):
                reply = connection.stream(CHAT, body, timed=True)
                if not reply.ok or len(reply.arrivals) != settings.gap_chunks + 2 or len(reply.sent_at) != len(reply.arrivals):
                    failures += 1
                    continue
                arrived = [reply.arrivals[i] for i in tokens]
                sent = [reply.sent_at[i] for i in tokens]
                gaps = [later - earlier for earlier, later in zip(arrived, arrived[1:])]
                sent_gaps = [later - earlier for earlier, later in zip(sent, sent[1:])]
                arrival_gaps[side] = gaps
                distortion[side] += [abs(gap - sent_gap) for gap, sent_gap in zip(gaps, sent_gaps)]
                latency[side] += [arrival - send for arrival, send in zip(arrived, sent)]
                tails[side].append(reply.ended - reply.arrivals[-1])  # last event to the end of the body
                if side == "proxy":  # sent apart, arrived together: the relay held a chunk back
                    batched += sum(gap < nominal / 4 <= sent_gap for gap, sent_gap in zip(gaps, sent_gaps))
            if len(arrival_gaps) == 2:
                pairwise += [abs(p - d) for p, d in zip(arrival_gaps["proxy"], arrival_gaps["direct"])]
        direct, proxy = _ms(summarize(distortion["direct"])), _ms(summarize(distortion["proxy"]))
        assert direct is not None and proxy is not None
        metric = Metric("GAP", f"inter-chunk gap distortion at {settings.token_rate:g} tokens/s, |arrival gap - send gap|",
                        "ms", TARGETS["GAP"], direct=direct, proxy=proxy)
        metric.value, metric.value_label = proxy.p95, "p95 through the proxy"
        metric.passed = proxy.p95 <= 2.0 and batched == 0 and failures == 0
        pair = _ms(summarize(pairwise))
        added = summarize(latency["proxy"]).median - summarize(latency["direct"]).median
        metric.details = {"batched_chunks": batched, "failed_streams": failures, "nominal_gap_ms": nominal * 1000.0,
                          "abs_gap_difference_proxy_vs_direct_run_ms": pair,
                          "delivery_latency_direct_ms": _ms(summarize(latency["direct"])),
                          "delivery_latency_proxy_ms": _ms(summarize(latency["proxy"])),
                          "added_delivery_latency_p50_ms": added * 1000.0,
                          "body_end_after_last_event_direct_ms": _ms(summarize(tails["direct"])),
                          "body_end_after_last_event_proxy_ms": _ms(summarize(tails["proxy"]))}
        assert pair is not None
        metric.note = (f"{batched} chunk(s) batched; each chunk's one-way delivery (send stamp to arrival) is "
                       f"{added * 1000:+.3f} ms longer through the proxy (p50); gaps of a proxied run against a direct "
                       f"run, |difference| p50 {pair.median:.3f} ms, p95 {pair.p95:.3f} ms (includes the upstream's "
                       "own pacing jitter in both runs)")
        return [metric]

    def p5_concurrency(self) -> list[Metric]:
        settings = self.settings
        body = chat_body(SYNTH, stream=True, chunks=settings.p5_chunks, rate=settings.p5_rate)
        result = run_concurrent(self.backend.port, self.proxy.port, self.proxy.pid, body, streams=settings.p5_streams,
                                runs=settings.p5_runs, expected_events=settings.p5_chunks + 3)
        self.rss_load_mb = max(result.rss_peaks_mb)
        return [concurrency_metric("P5", f"{settings.p5_streams} concurrent streams ({settings.p5_chunks} chunks at "
                                   f"{settings.p5_rate:g}/s each), aggregate rate", TARGETS["P5"], result),
                paced_cpu_metric("P5.cpu", f"proxy CPU per relayed event of the {settings.p5_streams} paced streams",
                                 result)]

    def p7_memory_cpu(self) -> list[Metric]:
        idle = Metric("P7", "proxy RSS idle (after warm-up)", "MB", TARGETS["P7"],
                      proxy=summarize([self.rss_idle_mb]))
        idle.value, idle.value_label = self.rss_idle_mb, "RSS"
        idle.passed = self.rss_idle_mb <= 80.0
        after = rss_mb(self.proxy.pid)
        idle.details = {"rss_fresh_mb": self.rss_fresh_mb, "rss_after_load_mb": after}
        idle.note = f"fresh start {self.rss_fresh_mb:.1f} MB; idle again after the 64-stream load {after:.1f} MB"
        load = Metric("P7.load", f"proxy RSS peak under {self.settings.p5_streams} streams", "MB", "report",
                      proxy=summarize([self.rss_load_mb]))
        load.value, load.value_label = self.rss_load_mb, "peak RSS"
        cpu = Metric("P7.cpu", "proxy CPU per 1,000 relayed chunks (unpaced P2 streams)", "ms", "report")
        per_thousand_ms = self.relay_cpu_s / self.relayed_chunks * 1000.0 * 1000.0
        cpu.proxy = summarize([per_thousand_ms])
        cpu.value, cpu.value_label = per_thousand_ms, "CPU ms / 1,000 chunks"
        cpu.details = {"cpu_s": self.relay_cpu_s, "chunks": self.relayed_chunks,
                       "us_per_chunk": per_thousand_ms}
        cpu.note = f"{per_thousand_ms:.3f} µs of proxy CPU per chunk ({self.relay_cpu_s:.2f} s for {self.relayed_chunks:,.0f} chunks)"
        return [idle, load, cpu]

    # ----- shared by both upstreams ---------------------------------------------------------------

    def p4_cold(self, label: str, model: str, argv_for: Callable[[int], list[str]], body: dict[str, Any],
                runs: int, *, health: str, startup_timeout_s: float = 60.0) -> list[Metric]:
        """Cold first token: our own spawn + readiness + first answer, against the proxy's cold path."""
        ready: list[float] = []
        cold_direct: list[float] = []
        cold_proxy: list[float] = []
        with Connection(self.proxy.port, timeout_s=180) as proxied:
            for _ in range(runs):
                self.proxy.unload(model)
                port = free_port()
                started = time.monotonic()
                child = self.processes.spawn(argv_for(port), name=f"direct-{model}", cwd=self.workdir)
                try:
                    ready_at = wait_http_ok(port, health, timeout_s=startup_timeout_s, alive=lambda: child.poll() is None)
                    with Connection(port) as direct:
                        reply = direct.stream(CHAT, body)
                    if not reply.ok or reply.ttft_s is None:
                        raise RuntimeError(f"direct cold request failed: {reply.error}")
                    ready.append(ready_at - started)
                    cold_direct.append(reply.started + reply.ttft_s - started)
                finally:
                    self.processes.stop(child)
                reply = proxied.stream(CHAT, body)
                if not reply.ok or reply.ttft_s is None:
                    raise RuntimeError(f"cold request through the proxy failed: {reply.error}")
                cold_proxy.append(reply.ttft_s)
        metric = Metric(f"P4.{label}", f"cold first token, {label}", "ms", TARGETS["P4"],
                        direct=_ms(summarize(cold_direct)), proxy=_ms(summarize(cold_proxy)))
        _added(metric, 50.0)
        metric.details = {"direct_ready_ms": _ms(summarize(ready))}
        metric.note = (f"direct = own spawn until {health} answers 200 (median {summarize(ready).median * 1000:.0f} ms) "
                       "plus the first streamed token; proxy = first token after /unload")
        return [metric]

    def p6_idle_exit(self, label: str, model: str, argv_for: Callable[[int], list[str]], body: dict[str, Any],
                     runs: int, *, health: str = "/health", startup_timeout_s: float = 60.0) -> list[Metric]:
        """From the idle deadline (answer end + unload_timer 1 s) until the backend pid has exited."""
        idle_s = 1.0
        after_deadline: list[float] = []
        own_exit: list[float] = []
        with Connection(self.proxy.port, timeout_s=180) as proxied:
            for _ in range(runs):
                reply = proxied.post(CHAT, body)
                answered = time.monotonic()
                if reply.status != 200:
                    raise RuntimeError(f"{model}: HTTP {reply.status}: {reply.body[:300]!r}")
                pid = self.proxy.backend(model).pid
                deadline = answered + idle_s
                give_up = deadline + 30.0
                while not process_exited(pid):
                    if time.monotonic() > give_up:
                        raise RuntimeError(f"{model}: pid {pid} still running 30 s after its idle deadline")
                    time.sleep(0.001)
                after_deadline.append(time.monotonic() - deadline)
                self._wait_state(model, "stopped")
        own_exit_pooled: list[float] = []
        for run in range(runs + 1):
            # The last run leaves its keep-alive connection open through the stop, as the proxy's
            # connection pool does: some servers (llama.cpp) wait for idle connections on exit.
            pooled = run == runs
            port = free_port()
            child = self.processes.spawn(argv_for(port), name=f"direct-{model}", cwd=self.workdir)
            direct = Connection(port)
            try:
                wait_http_ok(port, health, timeout_s=startup_timeout_s, alive=lambda: child.poll() is None)
                direct.post(CHAT, body)
                if not pooled:
                    direct.close()
                time.sleep(idle_s)  # idle as long as the proxied backend was
                (own_exit_pooled if pooled else own_exit).append(self.processes.time_sigterm_exit(child))
            finally:
                direct.close()
                self.processes.stop(child)
        metric = Metric(f"P6.{label}", f"idle deadline to backend exit, {label} (unload_timer 1 s)", "ms",
                        TARGETS["P6"], direct=_ms(summarize(own_exit)), proxy=_ms(summarize(after_deadline)))
        _added(metric, 1000.0)
        metric.value_label = "beyond own exit (p50)"
        pooled_ms = own_exit_pooled[0] * 1000.0
        metric.details = {"own_exit_with_idle_keepalive_connection_ms": pooled_ms}
        metric.note = ("direct = the backend's own SIGTERM-to-exit time (client connection closed); proxy = answer end "
                       "+ 1 s until the pid is gone (the idle clock starts a little before the answer's last byte "
                       f"arrives, so this can dip below 0); with an idle keep-alive connection left open, as the "
                       f"proxy's pool leaves one, the backend's own exit takes {pooled_ms:.1f} ms")
        return [metric]

    def _wait_state(self, model: str, state: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.proxy.status(model)["state"] != state:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{model} did not become {state} within {timeout_s:g}s")
            time.sleep(0.01)

    # ----- the wide proxy: 256 streams, swaps ----------------------------------------------------

    def run_wide(self, wide: ProxyUnderTest) -> None:
        """P8 and SWAP on the wide proxy (320 threads, max_loaded_models 1), stopped afterwards."""
        try:
            if self.settings.p8:
                self.measure("P8", lambda: measure_wide(wide, streams=self.settings.p8_streams,
                                                        chunks=self.settings.p8_chunks, rate=self.settings.p8_rate,
                                                        runs=self.settings.p8_runs, main_idle_mb=self.rss_idle_mb), wide)
            else:
                self.notes.append(f"P8 skipped (quick mode: opening {self.settings.p8_streams} streams through the "
                                  "proxy takes seconds on two cores; the full run measures it)")
            self.measure("SWAP", lambda: measure_swap(self.processes, wide, self.workdir, (SWAP_A, SWAP_B),
                                                      self.settings.swap_runs), wide)
        finally:
            wide.stop()

    # ----- TabbyAPI (the test bed) ----------------------------------------------------------------

    def run_tabby(self, tabby_dir: Path) -> None:
        """TABBY.swap.* on a third proxy whose tabbyapi profiles run the test bed, stopped afterwards."""
        directory = self.workdir / "tabby"
        config_path = write_tabby_config(directory, tabby_dir)
        tabby = ProxyUnderTest(self.processes, config_path, name="proxy-tabby", env=TABBY_KNOBS,
                               log_level=self.proxy_log_level, script=self.proxy_script)
        try:
            tabby.wait_healthy()
            self.measure("TABBY.swap", lambda: measure_tabby_swaps(
                self.processes, tabby, config_path, directory, TABBY_RESIDENT, TABBY_PLAIN, self.settings.tabby_runs,
                TABBY_KNOBS), tabby)
        finally:
            tabby.stop()

    # ----- the real SmolLM2 backend -------------------------------------------------------------

    def run_smollm2(self) -> None:
        for name in (SYNTH, SYNTH_IDLE):  # nothing else loaded while llama.cpp runs on the two cores
            self.proxy.unload(name)
        body = chat_body(SMOL, content="Name three colours.", chunks=8, temperature=0)
        backend = self.proxy.load(SMOL, body)
        command = psutil.Process(backend.pid).cmdline()
        self.measure("SMOL", lambda: self.smol_latency(backend.port, body))
        self.measure("P4.smollm2", lambda: self.p4_cold(
            "smollm2", SMOL, lambda port: _with_port(command, port), {**body, "stream": True},
            self.settings.smol_cold_runs, health="/health"))

        def idle_exit() -> list[Metric]:
            self.proxy.unload(SMOL)  # one llama.cpp at a time on the two cores
            return self.p6_idle_exit("smollm2", SMOL_IDLE, lambda port: _with_port(command, port),
                                     {**body, "model": SMOL_IDLE}, self.settings.smol_idle_runs)

        self.measure("P6.smollm2", idle_exit)

    def smol_latency(self, port: int, body: dict[str, Any]) -> list[Metric]:
        latency: dict[str, list[float]] = {"direct": [], "proxy": []}
        ttft: dict[str, list[float]] = {"direct": [], "proxy": []}
        texts: dict[str, set[str]] = {"direct": set(), "proxy": set()}
        failures = 0
        stream_body = {**body, "stream": True}
        with Connection(port) as direct, Connection(self.proxy.port) as proxied:
            sides = (("direct", direct), ("proxy", proxied))
            for index in range(self.settings.smol_runs + 2):  # the first two rounds warm up
                for side, connection in sides:
                    reply = connection.post(CHAT, body)
                    if reply.status != 200:
                        failures += 1
                    elif index >= 2:
                        latency[side].append(reply.elapsed_s)
            for index in range(self.settings.smol_runs + 2):
                for side, connection in sides:
                    streamed = connection.stream(CHAT, stream_body, collect_text=True)
                    if not streamed.ok or streamed.ttft_s is None:
                        failures += 1
                        continue
                    texts[side].add(streamed.text)
                    if index >= 2:
                        ttft[side].append(streamed.ttft_s)
        same = texts["direct"] == texts["proxy"] and len(texts["direct"]) == 1
        small = Metric("SMOL.latency", "added latency, small request (SmolLM2, 8 tokens, temperature 0)", "ms",
                       "report", direct=_ms(summarize(latency["direct"])), proxy=_ms(summarize(latency["proxy"])))
        _added(small, float("inf"))
        small.passed = None
        small.details = {"failed_requests": failures, "same_text_direct_and_proxy": same}
        small.note = f"streamed text identical direct and through the proxy: {same}"
        first = Metric("SMOL.ttft", "added time to first token (SmolLM2)", "ms", TARGETS["P3"],
                       direct=_ms(summarize(ttft["direct"])), proxy=_ms(summarize(ttft["proxy"])))
        _added(first, 1.0)
        first.passed = first.passed and failures == 0 and same
        return [small, first]


def _with_port(argv: list[str], port: int) -> list[str]:
    """Return a copy of a backend's command line with its --port value replaced."""
    if "--port" not in argv:
        raise RuntimeError(f"no --port in the backend's command line: {argv}")
    copy = list(argv)
    copy[copy.index("--port") + 1] = str(port)
    return copy


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy so far (all processes, all CPUs)."""
    times = psutil.cpu_times()
    return float(sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq")))


def _own_cpu_s() -> float:
    """CPU seconds of this process and of every descendant reaped so far (the proxy reaps its backends)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds into the finally blocks that stop the children


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shorter streams (< 1 min), no SmolLM2")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT}); "
                        "the markdown table goes next to it with the suffix .md")
    parser.add_argument("--smollm2", action=argparse.BooleanOptionalAction, default=None,
                        help="measure the real SmolLM2 backend (default: on in full mode, off with --quick)")
    parser.add_argument("--tabby", action=argparse.BooleanOptionalAction, default=None,
                        help="measure TabbyAPI swaps on the test bed (default: on in full mode, off with --quick)")
    parser.add_argument("--proxy-log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--proxy-script", type=Path, default=ROOT / "proxy.py",
                        help="the proxy to measure (default: this checkout's proxy.py; another checkout's to compare)")
    parser.add_argument("--llama-threads", type=int, default=1,
                        help="llama.cpp threads of the SmolLM2 profiles (default 1: on two cores a second llama.cpp "
                        "thread spins on the core the client and the proxy need, and the added latency measured "
                        "becomes the scheduler's)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the generated config folder and logs")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="bench %(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    settings = Settings.for_mode(args.quick, args.smollm2, args.tabby)
    started = time.monotonic()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_at_start = list(os.getloadavg())
    busy_at_start, own_at_start = _busy_cpu_s(), _own_cpu_s()
    workdir = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    processes = Processes(workdir / "logs")
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    bench: Bench | None = None
    notes: list[str] = []
    errors: list[str] = []
    interrupted = False
    gguf, missing = smollm2_gguf()
    try:
        proxy = ProxyUnderTest(processes, write_config(workdir, gguf, llama_threads=args.llama_threads),
                               log_level=args.proxy_log_level, script=args.proxy_script.resolve())
        # Started beside the main proxy so that their start-ups overlap; it idles until run_wide.
        wide = ProxyUnderTest(processes, write_wide_config(workdir / "wide"), name="proxy-wide",
                              log_level=args.proxy_log_level, script=args.proxy_script.resolve())
        try:
            proxy.wait_healthy()
            wide.wait_healthy()
            bench = Bench(settings, processes, proxy, workdir, proxy_script=args.proxy_script.resolve(),
                          proxy_log_level=args.proxy_log_level)
            bench.run_synthetic()
            bench.run_wide(wide)
            if settings.mode == "quick":
                notes.append(f"quick mode: CONN over {settings.conn_requests} requests, SWAP over {settings.swap_runs} swaps")
            if not settings.smollm2:
                notes.append("SmolLM2 part skipped (quick mode; --smollm2 to include it)")
            elif gguf is None:
                notes.append(f"SmolLM2 part skipped: {missing}")
            else:
                bench.run_smollm2()
            if not settings.tabby:
                notes.append("TABBY.swap skipped (quick mode: it takes about 40 s; --tabby to include it)")
            else:
                tabby_dir, why = tabby_testbed()
                if tabby_dir is None:
                    notes.append(f"TABBY.swap skipped: {why}")
                else:
                    bench.run_tabby(tabby_dir)
        finally:
            wide.close()
            proxy.close()
    except KeyboardInterrupt:
        interrupted = True
        errors.append("interrupted: the results are partial")
    except Exception as exc:
        log.exception("the benchmark failed")
        errors.append(f"setup: {type(exc).__name__}: {exc}")
    finally:
        survivors = processes.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if survivors:
            errors.append(f"backend processes outlived the proxy and were killed: {survivors}")
    wall_s = time.monotonic() - started
    cpus = os.cpu_count() or 1
    foreign_percent = max(0.0, (_busy_cpu_s() - busy_at_start) - (_own_cpu_s() - own_at_start)) / (wall_s * cpus) * 100.0
    metrics = bench.metrics if bench else []
    if bench:
        notes += bench.notes
        errors = bench.errors + errors
    notes.append(f"other processes on the machine used {foreign_percent:.0f}% of its {cpus} CPUs during the run "
                 f"(load average {load_at_start[0]:.2f} at the start): the higher, the noisier the figures")
    meta = {
        "mode": settings.mode, "started_at": started_at, "duration_s": time.monotonic() - started,
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "load_average_start": load_at_start, "foreign_cpu_percent": foreign_percent,
        "load_average_end": list(os.getloadavg()), "proxy_threads": PROXY_THREADS,
        "wide_proxy_threads": WIDE_PROXY_THREADS, "interrupted": interrupted,
        "settings": dataclasses.asdict(settings), "smollm2_gguf": str(gguf) if gguf else None,
        "proxy_script": str(args.proxy_script.resolve()), "llama_threads": args.llama_threads,
    }
    markdown_path = write_results(args.out, meta, metrics, notes, errors)
    print(markdown(meta, metrics, notes, errors))
    log.info("results: %s and %s", args.out, markdown_path)
    if args.keep_workdir or errors:
        log.info("work folder kept: %s", workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if interrupted:
        return 130
    if errors:
        return 1
    return 1 if args.strict and any(metric.passed is False for metric in metrics) else 0
