"""The request log: an Observer that writes one row per finished request (never a prompt or an answer)
from one background thread, and the reads behind /usage and `proxy.py usage`. A slow, full or
failing database costs rows, counted in `dropped`, never a request. Storage is request_stores.py's.
"""

from __future__ import annotations

import collections
import logging
import math
import operator
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from proxy.observe import RequestRecord
from proxy.records import ModelEvent
from proxy.request_stores import BOOLEANS, NAMES, TABLE, PostgresStore, SQLiteStore, Store, StoreError, Writer
from proxy.settings import ProxySettings

log = logging.getLogger(__name__)

QUEUE_ROWS = 10_000        # rows waiting for the writer; beyond it a row is dropped and counted
PRUNE_EVERY_S = 3600.0     # retention runs at start-up and then about hourly
RETRY_S = (0.5, 60.0)      # after a failed write: the first wait, doubling up to the longest
WARN_EVERY_S = 60.0        # a failing database is warned about at most this often
CLOSE_TIMEOUT_S = 5.0      # close() writes what is queued for at most this long
LINGER_S = 0.1             # after a write the writer gathers rows this long: one transaction per 0.1 s, not per request
SQLITE_FILE = "requests.sqlite3"
GROUPINGS = ("key", "model", "day")
_WAKE = object()           # put by close() so the writer notices at once

Clock = Callable[[], float]


class RequestLog:
    """Rows of `RequestRecord`s in a Store. request_done never blocks and never raises; the writer
    thread batches what is queued into one transaction (at most one per LINGER_S: rows show within
    about 0.1 s, and a busy proxy writes ten transactions a second, not one per request), retries a
    failing store with backoff and deletes rows older than `keep_days`. Reads (`recent`, `usage`)
    run on the caller's thread.

    With write=False it only reads (the CLI): no thread, and request_done drops what it is given.
    """

    def __init__(self, store: Store, *, keep_days: float, write: bool = True, queue_rows: int = QUEUE_ROWS,
                 prune_every_s: float = PRUNE_EVERY_S, retry_s: tuple[float, float] = RETRY_S,
                 linger_s: float = LINGER_S, clock: Clock = time.time) -> None:
        self.store = store
        self._keep_s = keep_days * 86400.0
        self._prune_every_s = prune_every_s
        self._retry_s = retry_s
        self._linger_s = linger_s
        self._clock = clock  # wall clock: rows carry epoch seconds
        self._batch_max = queue_rows  # what one transaction takes at most, so a long outage holds bounded rows
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_rows)
        self._progress = threading.Condition()
        self._accepted = 0   # guarded by _progress: rows queued
        self._settled = 0    # guarded by _progress: rows written, or dropped by the writer
        self._dropped = 0    # guarded by _progress
        self._written = 0    # guarded by _progress
        self._failures = 0   # writer thread only (read without the lock: an int)
        self._warned_at = -math.inf
        self._failing = False
        self._stop = threading.Event()
        self._close_deadline = math.inf
        self._thread: threading.Thread | None = None
        if write:
            self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
            self._thread.start()

    # ----- the Observer ------------------------------------------------------------------------

    def request_done(self, record: RequestRecord) -> None:
        """Queue the record's row; when the queue is full or the log closed, drop and count it."""
        if self._thread is None or self._stop.is_set():
            self._count_dropped(1)
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._count_dropped(1)
            return
        with self._progress:
            self._accepted += 1

    def model_event(self, event: ModelEvent) -> None:
        return None

    def rejected(self, reason: str) -> None:
        return None

    # ----- what the operator's view reads ------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Rows never written: the queue was full, or the store still failed when the log closed."""
        with self._progress:
            return self._dropped

    @property
    def written(self) -> int:
        with self._progress:
            return self._written

    @property
    def failures(self) -> int:
        """Failed attempts to reach or write the store since start-up."""
        return self._failures

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def recent(self, limit: int = 100, model: str | None = None) -> list[dict[str, Any]]:
        """Return the newest `limit` rows (of `model` only, if given), newest first, as RequestRecord dicts.

        Raises StoreError when the store cannot be read.
        """
        where, params = ("WHERE model = %s", [model]) if model is not None else ("", [])
        rows = self.store.read(f"SELECT {', '.join(NAMES)} FROM {TABLE} {where} ORDER BY time DESC, id DESC LIMIT %s",
                               [*params, max(0, int(limit))])
        return [{name: bool(value) if name in BOOLEANS else value for name, value in zip(NAMES, row)} for row in rows]

    def usage(self, since_s: float, by: str = "model") -> list[dict[str, Any]]:
        """Return per key, model or UTC day of the last `since_s` seconds: requests, errors (status >= 400),
        tokens, p50/p95 of duration_s and ttft_s, and the first and last arrival (epoch seconds).

        Percentiles are computed here from the rows, the same way for every store. Raises ValueError
        for an unknown `by` and StoreError when the store cannot be read.
        """
        if by not in GROUPINGS:
            raise ValueError(f"by: expected one of {', '.join(GROUPINGS)}, got {by!r}")
        rows = self.store.read(f"SELECT time, key, model, status, prompt_tokens, completion_tokens, duration_s, ttft_s "
                               f"FROM {TABLE} WHERE time >= %s", [self._clock() - since_s])
        return summarize(rows, by)

    # ----- flushing and closing ----------------------------------------------------------------

    def flush(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait until every row queued before this call is written (or dropped); say whether that happened."""
        with self._progress:
            target = self._accepted
            return self._progress.wait_for(lambda: self._settled >= target, timeout=timeout_s)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued, for at most timeout_s, and stop the writer; rows still unwritten are dropped."""
        thread = self._thread
        if thread is None or self._stop.is_set():
            return
        self._close_deadline = time.monotonic() + timeout_s
        self._stop.set()
        try:
            self._queue.put_nowait(_WAKE)
        except queue.Full:
            pass  # the writer has rows to take, so it is awake
        thread.join(timeout_s + 1.0)
        if thread.is_alive():  # stuck in the database (a lock, a dead server): it is a daemon, let it go
            left = self._queue.qsize()
            log.warning("request log: %s did not finish writing within %gs; %d queued rows are lost",
                        self.store.name, timeout_s, left)
            self._count_dropped(left)

    # ----- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        writer: Writer | None = None
        pending: list[RequestRecord] = []
        prune_at = time.monotonic()  # at start-up
        backoff = self._retry_s[0]
        while True:
            self._take(pending, wait_s=0.0 if pending else max(0.0, min(prune_at - time.monotonic(), 1.0)))
            stopping = self._stop.is_set()
            prune = time.monotonic() >= prune_at and not stopping
            if pending or prune:
                try:
                    writer = writer or self.store.connect()
                    if prune:
                        deleted = writer.delete_before(self._clock() - self._keep_s)
                        prune_at = time.monotonic() + self._prune_every_s
                        if deleted:
                            log.info("request log: deleted %d rows older than %g days", deleted,
                                     self._keep_s / 86400)
                    if pending:
                        writer.insert(pending)
                except Exception as exc:  # the top of a thread's loop: any failure is retried, never raised
                    if writer is not None:
                        writer.close()
                        writer = None
                    self._failed(exc, len(pending))
                    left_s = self._close_deadline - time.monotonic()
                    if stopping and left_s <= 0:
                        self._settle(len(pending), written=False)
                        self._settle(self._drain(), written=False)
                        log.warning("request log: %s still fails at shutdown; rows not written are dropped "
                                    "(%d in all since start-up)", self.store.name, self.dropped)
                        break
                    if stopping:
                        time.sleep(min(backoff, left_s))
                    else:
                        self._stop.wait(backoff)  # close() cuts the wait short, to flush at once
                    backoff = min(backoff * 2, self._retry_s[1])
                    continue
                backoff = self._retry_s[0]
                if self._failing:
                    self._failing = False
                    log.info("request log: writing to %s again (%d failed attempts so far)", self.store.name,
                             self._failures)
                if pending:
                    self._settle(len(pending), written=True)
                    pending = []
                    self._stop.wait(self._linger_s)  # close() cuts it short, to write the rest at once
            if stopping and not pending and self._queue.empty():
                break
        if writer is not None:
            writer.close()

    def _take(self, pending: list[RequestRecord], wait_s: float) -> None:
        """Move what is queued into pending, up to a batch; wait up to wait_s for the first row."""
        try:
            item = self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, RequestRecord):
                pending.append(item)
            if len(pending) >= self._batch_max:
                return
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def _drain(self) -> int:
        count = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return count
            count += isinstance(item, RequestRecord)

    def _settle(self, rows: int, *, written: bool) -> None:
        with self._progress:
            self._settled += rows
            if written:
                self._written += rows
            else:
                self._dropped += rows
            self._progress.notify_all()

    def _count_dropped(self, rows: int) -> None:
        with self._progress:
            self._dropped += rows

    def _failed(self, exc: Exception, waiting: int) -> None:
        self._failures += 1
        self._failing = True
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY_S:
            return
        self._warned_at = now
        # StoreError messages are already masked; anything else is masked here and shown without a traceback.
        message = str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {self.store.scrub(str(exc))}"
        log.warning("request log: %s; %d failed attempts so far, %d rows waiting, %d dropped; retrying with "
                    "backoff (requests are not affected; warned at most every %gs)", message, self._failures,
                    waiting + self._queue.qsize(), self.dropped, WARN_EVERY_S)


def open_request_log(settings: ProxySettings, *, write: bool = True) -> RequestLog | None:
    """Return the request log `proxy.request_log` names, its writer started (None when it is `off`).

    write=False opens it for reading only (the CLI): no thread, nothing created.
    """
    target = settings.request_log
    if target == "off":
        return None
    store: Store
    if target.startswith(("postgresql://", "postgres://")):
        store = PostgresStore(target)
    else:
        store = SQLiteStore(settings.state_dir / SQLITE_FILE if target == "sqlite" else Path(target))
    if write:
        log.info("request log: %s, rows kept %g days", store.name, settings.request_log_days)
    return RequestLog(store, keep_days=settings.request_log_days, write=write)


# ----- usage: pure functions over rows -------------------------------------------------------------

_WINDOW_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_WINDOW = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?[smhdw])+")


def parse_window(text: str) -> float:
    """Return a duration like "30m", "24h", "7d" or "1d12h" as seconds; raise ValueError otherwise."""
    value = text.strip().lower()
    seconds = sum(float(number) * _WINDOW_UNITS_S[unit]
                  for number, unit in re.findall(r"([0-9.]+)([smhdw])", value)) if _WINDOW.fullmatch(value) else 0.0
    if not seconds > 0:
        raise ValueError(f"expected a duration like 30m, 24h or 7d, got {text!r}")
    return seconds


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """Return the p-th percentile (0-100) of sorted values, interpolated between the closest ranks (numpy's
    default and PostgreSQL's percentile_cont); None for no values."""
    if not ordered:
        return None
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(rows: Iterable[Sequence[Any]], by: str) -> list[dict[str, Any]]:
    """Group rows of (time, key, model, status, prompt_tokens, completion_tokens, duration_s, ttft_s) by
    `by`; days (UTC, "YYYY-MM-DD") oldest first, keys and models busiest first."""
    buckets: dict[Any, list[Sequence[Any]]] = collections.defaultdict(list)
    if by == "day":  # one step per row in Python; everything after runs over whole columns
        for row in rows:
            buckets[int(row[0] // 86400)].append(row)
    else:
        column = 1 if by == "key" else 2
        for row in rows:
            buckets[row[column]].append(row)
    summaries = []
    for name, members in buckets.items():
        times, statuses, prompts, completions, durations, ttfts = (
            list(map(operator.itemgetter(index), members)) for index in (0, 3, 4, 5, 6, 7))  # zip(*) is slower
        durations.sort()
        present = sorted(ttft for ttft in ttfts if ttft is not None)
        summaries.append({
            by: datetime.fromtimestamp(name * 86400, timezone.utc).date().isoformat() if by == "day" else name,
            "requests": len(members),
            "errors": sum(status >= 400 for status in statuses),
            "prompt_tokens": sum(filter(None, prompts)),
            "completion_tokens": sum(filter(None, completions)),
            "duration_p50_s": percentile(durations, 50),
            "duration_p95_s": percentile(durations, 95),
            "ttft_p50_s": percentile(present, 50),
            "ttft_p95_s": percentile(present, 95),
            "first": min(times),
            "last": max(times),
        })
    if by == "day":
        return sorted(summaries, key=lambda group: str(group["day"]))
    return sorted(summaries, key=lambda group: (-group["requests"], group[by] is None, group[by] or ""))
