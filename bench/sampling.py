"""What the benchmark reads of a running process from the outside: its CPU seconds and its RSS.

Both read /proc through psutil, so they cost the measured process nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psutil  # type: ignore[import-untyped]  # no stubs in requirements-dev.txt

MB = 1_000_000  # decimal megabytes, as the targets are written


class CpuMeter:
    """CPU seconds (user + system, all threads) a process used, read at will or summed over windows."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.total_s = 0.0

    def now_s(self) -> float:
        """Return the process's CPU seconds so far."""
        times = self._process.cpu_times()
        return float(times.user + times.system)

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Add the CPU the process uses inside the block to total_s."""
        mark = self.now_s()
        try:
            yield
        finally:
            self.total_s += self.now_s() - mark


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / MB


class RssSampler:
    """Samples a process's RSS (and thread count) in a thread while the block runs; peak_mb after it."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self._process = psutil.Process(pid)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.samples: list[float] = []
        self.threads_peak = 0
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._process.memory_info().rss / MB)
                self.threads_peak = max(self.threads_peak, self._process.num_threads())
            except psutil.Error:
                return
            self._stop.wait(self._interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return max(self.samples, default=float("nan"))
