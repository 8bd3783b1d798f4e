"""Many paced streams at once (P5: 64 on the main proxy, P8: 256 on the wide proxy), direct and through
the proxy, with the proxy's RSS sampled meanwhile. Rounds alternate direct and proxied; all streams of
a round come from one thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from bench.client import Connection, run_streams
from bench.report import Metric
from bench.sampling import CpuMeter, RssSampler, rss_mb
from bench.stack import PROXY_THREADS, SWAP_A, WIDE_PROXY_THREADS, ProxyUnderTest
from bench.stats import Summary, summarize

CHAT = "/v1/chat/completions"


@dataclass(slots=True)
class Concurrency:
    """What the rounds showed, per side ("direct", "proxy")."""

    streams: int
    rates: dict[str, list[float]] = field(default_factory=lambda: {"direct": [], "proxy": []})  # events/s, all streams
    errors: dict[str, int] = field(default_factory=lambda: {"direct": 0, "proxy": 0})
    examples: list[str] = field(default_factory=list)
    begun: dict[str, list[float]] = field(default_factory=lambda: {"direct": [], "proxy": []})
    rss_peaks_mb: list[float] = field(default_factory=list)
    threads_peak: int = 0
    proxy_cpu_s: float = 0.0      # the proxy's CPU over its rounds (opening the streams included)
    proxy_events: int = 0         # the events it relayed in them

    @property
    def ratio(self) -> float:
        return summarize(self.rates["proxy"]).median / summarize(self.rates["direct"]).median


def run_concurrent(direct_port: int, proxy_port: int, proxy_pid: int, body: dict[str, Any], *, streams: int,
                   runs: int, expected_events: int) -> Concurrency:
    """Run `runs` rounds of `streams` identical streams on each side; sample the proxy's RSS on its rounds."""
    result = Concurrency(streams)
    cpu = CpuMeter(proxy_pid)
    for _ in range(runs):
        for side, port in (("direct", direct_port), ("proxy", proxy_port)):
            if side == "proxy":
                with RssSampler(proxy_pid) as sampler, cpu.counting():
                    replies = run_streams(port, CHAT, [body] * streams)
                result.rss_peaks_mb.append(sampler.peak_mb)
                result.proxy_events += sum(reply.events for reply in replies)
                result.threads_peak = max(result.threads_peak, sampler.threads_peak)
            else:
                replies = run_streams(port, CHAT, [body] * streams)
            bad = [reply for reply in replies if not reply.ok or reply.events != expected_events]
            result.errors[side] += len(bad)
            result.examples += [f"{side}: {reply.error or f'{reply.events} events'}" for reply in bad[:3]]
            span = max(reply.ended for reply in replies) - min(reply.started for reply in replies)
            result.rates[side].append(sum(reply.events for reply in replies if reply.ok) / span)
            first_tokens = [reply.started + reply.ttft_s for reply in replies if reply.ttft_s is not None]
            if first_tokens:  # how long until every stream had begun: the ramp-up, not the relay
                result.begun[side].append(max(first_tokens) - min(reply.started for reply in replies))
    result.proxy_cpu_s = cpu.total_s
    return result


def paced_cpu_metric(key: str, title: str, result: Concurrency) -> Metric:
    """The proxy's CPU per relayed event of paced streams: each token is one read and one write."""
    per_event_us = result.proxy_cpu_s / max(result.proxy_events, 1) * 1e6
    metric = Metric(key, title, "µs", "report", proxy=summarize([per_event_us]), value=per_event_us,
                    value_label="CPU µs / event")
    metric.details = {"cpu_s": result.proxy_cpu_s, "events": result.proxy_events}
    metric.note = (f"{result.proxy_cpu_s:.2f} s of proxy CPU for {result.proxy_events:,} events, opening the "
                   f"{result.streams} streams of each round included: at this cost one core relays about "
                   f"{1e6 / per_event_us:,.0f} paced events/s")
    return metric


def concurrency_metric(key: str, title: str, target: str, result: Concurrency, *, min_ratio: float = 0.9) -> Metric:
    """The row of a concurrency measurement: aggregate rates, their ratio, errors and the ramp-up."""
    direct, proxy = summarize(result.rates["direct"]), summarize(result.rates["proxy"])
    ratio = proxy.median / direct.median
    metric = Metric(key, title, "chunks/s", target, direct=direct, proxy=proxy, ratio=ratio, value=ratio,
                    value_label="ratio of medians", passed=result.errors["proxy"] == 0 and ratio >= min_ratio)
    begun: dict[str, Summary | None] = {side: summarize(values).scaled(1000.0) if values else None
                                        for side, values in result.begun.items()}
    metric.details = {"errors": result.errors, "error_examples": result.examples[:6],
                      "proxy_threads_peak": result.threads_peak, "all_streams_begun_ms": begun}
    ramp = ", ".join(f"{side} {value.median:.0f} ms" for side, value in begun.items() if value is not None)
    metric.note = (f"errors: proxy {result.errors['proxy']}, direct {result.errors['direct']}; first token of the last "
                   f"stream to begin, from the first request: {ramp}")
    return metric


def measure_wide(wide: ProxyUnderTest, *, streams: int, chunks: int, rate: float, runs: int,
                 main_idle_mb: float) -> list[Metric]:
    """P8 and P8.mem: `streams` paced streams at once on the wide proxy; its RSS per open stream."""
    def body(chunks: int, rate: float | None = None) -> dict[str, Any]:
        extra = {} if rate is None else {"x_token_rate": rate}
        return {"model": SWAP_A, "messages": [{"role": "user", "content": "Say hello."}], "stream": True,
                "max_tokens": chunks, **extra}

    backend = wide.load(SWAP_A, {**body(2), "stream": False})
    with Connection(wide.port) as warm:
        for _ in range(5):
            warm.stream(CHAT, body(8))
    time.sleep(0.5)
    idle_mb = rss_mb(wide.pid)
    result = run_concurrent(backend.port, wide.port, wide.pid, body(chunks, rate), streams=streams, runs=runs,
                            expected_events=chunks + 3)
    metric = concurrency_metric("P8", f"{streams} concurrent streams ({chunks} chunks at {rate:g}/s each), "
                                "aggregate rate", "0 errors, >= 0.9", result)
    metric.note += (f"; this proxy runs with threads: {WIDE_PROXY_THREADS} (the default, 64, would refuse most of "
                    f"{streams} streams at once with 503 server_busy)")
    peak = max(result.rss_peaks_mb)
    per_stream_kb = (peak - idle_mb) / streams * 1000.0
    memory = Metric("P8.mem", f"proxy RSS under {streams} streams, per open stream", "MB", "report",
                    proxy=summarize([peak]), value=per_stream_kb, value_label="(peak - idle) / streams",
                    value_unit="KB per stream")
    memory.details = {"rss_idle_mb": idle_mb, "rss_peak_mb": peak, "threads": WIDE_PROXY_THREADS,
                      "threads_peak": result.threads_peak}
    memory.note = (f"RSS peak {peak:.1f} MB against {idle_mb:.1f} MB idle after warm-up (with {WIDE_PROXY_THREADS} "
                   f"threads; the main proxy, {PROXY_THREADS} threads, idles at {main_idle_mb:.1f} MB)")
    return [metric, memory, paced_cpu_metric("P8.cpu", f"proxy CPU per relayed event of the {streams} paced streams",
                                             result)]
