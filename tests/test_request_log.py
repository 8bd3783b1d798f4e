"""The request log against real SQLite files and a real PostgreSQL server (a throwaway cluster this
file starts with Debian's binaries): rows and schema, dropping when full without blocking, restarts,
retention, usage figures, and a failing database that never fails a request nor shows its password.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.config import load_config
from proxy.observe import RequestRecord
from proxy.request_log import RequestLog, open_request_log, parse_window, percentile
from proxy.request_stores import TABLE, PostgresStore, SQLiteStore, Store, StoreError, masked_url
from tests.conftest import FIGURES, free_port, wait_until, write_config

FAST_RETRY = (0.05, 0.2)


def record(**fields: Any) -> RequestRecord:
    values: dict[str, Any] = {
        "time": time.time(), "key": "alice", "client": "127.0.0.1", "route": "/v1/chat/completions",
        "dialect": "openai", "model": "qwen", "status": 200, "error": None, "waited_s": 0.25, "ttft_s": 0.125,
        "duration_s": 1.5, "prompt_tokens": 12, "completion_tokens": 34, "bytes_in": 321, "bytes_out": 4321,
        "stream": True, "loaded": False,
    }
    values.update(fields)
    return RequestRecord(**values)


# ----- a throwaway PostgreSQL cluster --------------------------------------------------------------

def postgres_bin() -> Path | None:
    """Return the newest Debian PostgreSQL bin folder holding initdb and postgres, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda path: int(path.parent.name)
                   if path.parent.name.isdigit() else 0)
    usable = [path for path in found if (path / "initdb").is_file() and (path / "postgres").is_file()]
    return usable[-1] if usable else None


class PostgresServer:
    """A PostgreSQL server on 127.0.0.1 with password auth, run as an unprivileged user; stopped by its PID."""

    def __init__(self, bin_dir: Path, root: Path) -> None:
        self.root = root
        self.user = "proxy"
        self.password = f"s3cr@t/{secrets.token_hex(6)}"  # '@' and '/' must be percent-encoded in URLs
        self.port = free_port()
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            account = pwd.getpwnam("postgres") if _has_user("postgres") else pwd.getpwnam("nobody")
            self._as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            os.chown(root, account.pw_uid, account.pw_gid)
        (root / "socket").mkdir()
        (root / "password").write_text(self.password + "\n")
        for path in (root / "socket", root / "password"):
            if self._as:
                os.chown(path, self._as["user"], self._as["group"])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        subprocess.run([str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", self.user, "--pwfile",
                        str(root / "password"), "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                        "--no-locale", "--no-sync"], check=True, capture_output=True, env=env, cwd=root, timeout=120,
                       **self._as)
        self._log = (root / "postgres.log").open("wb")
        self.popen = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(root / "data"), "-k", str(root / "socket"), "-h", "127.0.0.1",
             "-p", str(self.port), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True, **self._as)
        wait_until(self._accepts, timeout_s=30, what=f"PostgreSQL on port {self.port}")
        self._databases = 0

    def _accepts(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"postgres exited with {self.popen.returncode}: "
                                 f"{(self.root / 'postgres.log').read_text()[-2000:]}")
        try:
            psycopg.connect(self.url("postgres"), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def url(self, database: str, password: str | None = None) -> str:
        secret = urllib.parse.quote(self.password if password is None else password, safe="")
        return f"postgresql://{self.user}:{secret}@127.0.0.1:{self.port}/{database}"

    def new_database_name(self) -> str:
        self._databases += 1
        return f"log{self._databases}"

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)  # "fast" shutdown: ends sessions, checkpoints, exits
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One cluster for this file's tests; missing binaries skip them, except in CI where they fail."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        message = ("PostgreSQL server binaries missing (no /usr/lib/postgresql/*/bin/initdb): "
                   "apt-get install postgresql (.ci/run does)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # Under root the server runs as an unprivileged user, who cannot enter pytest's root-only temp
    # folder: the cluster gets a folder of its own, removed at the end.
    root = Path(tempfile.mkdtemp(prefix="request-log-postgres-"))
    server = PostgresServer(bin_dir, root)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# ----- the two backends, one interface for the tests -----------------------------------------------

@dataclass
class Target:
    """Where a test's request log lives, fresh per test, and how to stall or read it behind the log's back."""

    kind: str
    store: Callable[[], Store]
    hold_write_lock: Callable[[], AbstractContextManager[None]]
    count_rows: Callable[[], int]
    column_types: Callable[[], dict[str, str]]
    indexes: Callable[[], set[str]]

    def open(self, **options: Any) -> RequestLog:
        options.setdefault("retry_s", FAST_RETRY)
        return RequestLog(self.store(), keep_days=options.pop("keep_days", 30.0), **options)


def sqlite_target(path: Path) -> Target:
    def connect() -> sqlite3.Connection:
        return sqlite3.connect(path, isolation_level=None)

    @contextmanager
    def hold_write_lock() -> Iterator[None]:
        connection = connect()
        connection.execute("BEGIN EXCLUSIVE")  # in WAL mode: every other writer waits
        try:
            yield
        finally:
            connection.execute("ROLLBACK")
            connection.close()

    def count_rows() -> int:
        with connect() as connection:
            return int(connection.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0])

    def column_types() -> dict[str, str]:
        with connect() as connection:
            return {row[1]: row[2] for row in connection.execute(f"PRAGMA table_info({TABLE})")}

    def indexes() -> set[str]:
        with connect() as connection:
            return {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (TABLE,))}

    return Target("sqlite", lambda: SQLiteStore(path), hold_write_lock, count_rows, column_types, indexes)


def postgres_target(server: PostgresServer) -> Target:
    database = server.new_database_name()
    server.create_database(database)

    def connect() -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(server.url(database), autocommit=True)

    @contextmanager
    def hold_write_lock() -> Iterator[None]:
        with psycopg.connect(server.url(database)) as connection:
            connection.execute(f"LOCK TABLE {TABLE} IN EXCLUSIVE MODE")  # inserts and COPY wait
            try:
                yield
            finally:
                connection.rollback()

    def count_rows() -> int:
        with connect() as connection:
            row = connection.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
            assert row is not None
            return int(row[0])

    def column_types() -> dict[str, str]:
        with connect() as connection:
            return {name: kind for name, kind in connection.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s", (TABLE,))}

    def indexes() -> set[str]:
        with connect() as connection:
            return {name for (name,) in connection.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s",
                                                           (TABLE,))}

    return Target("postgresql", lambda: PostgresStore(server.url(database)), hold_write_lock, count_rows,
                  column_types, indexes)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "sqlite":
        return sqlite_target(tmp_path / "requests.sqlite3")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return postgres_target(server)


@pytest.fixture
def open_log(target: Target) -> Iterator[Callable[..., RequestLog]]:
    """Factory of request logs on the test's target; every one is closed at the end."""
    opened: list[RequestLog] = []

    def open_one(**options: Any) -> RequestLog:
        opened.append(target.open(**options))
        return opened[-1]

    yield open_one
    for log in opened:
        log.close(timeout_s=2)


# ----- rows and schema -----------------------------------------------------------------------------

def test_every_field_of_a_record_is_written_to_a_named_typed_schema(target: Target,
                                                                   open_log: Callable[..., RequestLog]) -> None:
    log = open_log()
    full = record(time=1_800_000_000.123456, key="bob", client="10.0.0.7", route="/api/chat", dialect="ollama",
                  model="llama", status=503, error="model_busy", waited_s=30.0, ttft_s=None, duration_s=30.0004,
                  prompt_tokens=None, completion_tokens=None, bytes_in=7, bytes_out=2 ** 40, stream=False,
                  loaded=True)
    keyless = record(key=None, model=None, waited_s=None, route="-", dialect="other", status=404,
                     error="not_found", time=1_800_000_001.0)
    log.request_done(full)
    log.request_done(keyless)
    assert log.flush(10)
    assert log.recent(10) == [keyless.as_dict(), full.as_dict()]  # newest first, every field as recorded
    assert log.recent(10, model="llama") == [full.as_dict()]
    assert log.recent(1) == [keyless.as_dict()]

    types = target.column_types()
    assert set(types) == {"id", *full.as_dict()}
    if target.kind == "postgresql":
        assert types["time"] == "double precision" and types["status"] == "integer"
        assert types["bytes_out"] == "bigint" and types["stream"] == "boolean" and types["key"] == "text"
    else:
        assert types["time"] == "REAL" and types["status"] == "INTEGER" and types["key"] == "TEXT"
    assert {f"{TABLE}_time", f"{TABLE}_key", f"{TABLE}_model"} <= target.indexes()
    assert log.dropped == 0 and log.written == 2


def test_a_full_queue_drops_rows_without_blocking_and_counts_them(target: Target,
                                                                  open_log: Callable[..., RequestLog]) -> None:
    log = open_log()
    log.request_done(record())
    assert log.flush(10)  # the table exists: the writer can now be stalled on its lock
    burst = [record(duration_s=float(number)) for number in range(20_000)]
    with target.hold_write_lock():
        log.request_done(record())
        wait_until(lambda: log.queued == 0, what="the writer to take the row and block on the lock")
        started = time.perf_counter()
        for row in burst:
            log.request_done(row)
        elapsed = time.perf_counter() - started
        assert log.queued == 10_000
        assert log.dropped == 10_000  # the queue holds 10,000: the rest were dropped, none blocked
    assert elapsed < 1.0, f"20,000 request_done calls took {elapsed:.3f}s against a stalled writer"
    FIGURES[f"request_log_{target.kind}_20000_records_into_a_stalled_writer_s"] = round(elapsed, 4)
    assert log.flush(30)
    assert target.count_rows() == 2 + 10_000 and log.written == 10_002 and log.dropped == 10_000


def test_rows_per_second_written(target: Target, open_log: Callable[..., RequestLog]) -> None:
    log = open_log()
    rows = [record(duration_s=float(number)) for number in range(5_000)]
    log.request_done(rows[0])
    assert log.flush(10)
    started = time.perf_counter()
    for _ in range(6):  # 30,000 rows, never more than the queue holds
        for row in rows:
            log.request_done(row)
        assert log.flush(30)
    elapsed = time.perf_counter() - started
    assert log.dropped == 0 and target.count_rows() == 30_001
    FIGURES[f"request_log_{target.kind}_rows_per_s"] = round(30_000 / elapsed)


def test_rows_survive_a_restart(target: Target, open_log: Callable[..., RequestLog]) -> None:
    first = open_log()
    before = [record(time=1_800_000_000.0 + number, model=f"m{number}") for number in range(3)]
    for row in before:
        first.request_done(row)
    first.close()  # flushes what is queued
    assert first.written == 3
    first.request_done(record())  # after close: dropped, never raised
    assert first.dropped == 1

    second = open_log()
    assert second.recent(10) == [row.as_dict() for row in reversed(before)]
    second.request_done(record(time=1_800_000_010.0))
    assert second.flush(10)
    assert target.count_rows() == 4


def test_retention_deletes_old_rows_at_start_up_and_then_periodically(target: Target,
                                                                      open_log: Callable[..., RequestLog]) -> None:
    now = time.time()
    first = open_log(keep_days=365)
    first.request_done(record(time=now - 40 * 86400, model="old"))
    first.request_done(record(time=now - 10 * 86400, model="recent"))
    first.close()
    assert target.count_rows() == 2

    second = open_log(keep_days=30, prune_every_s=0.2)  # start-up removes the 40-day-old row
    wait_until(lambda: [row["model"] for row in second.recent(10)] == ["recent"], what="start-up retention")
    second.request_done(record(time=now - 31 * 86400, model="late"))  # arrives old: the next round removes it
    assert second.flush(10)
    wait_until(lambda: target.count_rows() == 1, what="periodic retention")
    assert [row["model"] for row in second.recent(10)] == ["recent"]


# ----- usage ---------------------------------------------------------------------------------------

DAY = datetime(2026, 11, 30, tzinfo=timezone.utc).timestamp()  # midnight UTC


def usage_rows() -> list[RequestRecord]:
    return [
        # qwen, alice: durations 1, 2, 3, 4; ttft 0.1, 0.2, 0.3 and one missing; two errors
        record(time=DAY - 3600, key="alice", model="qwen", status=200, duration_s=1.0, ttft_s=0.1,
               prompt_tokens=10, completion_tokens=1),
        record(time=DAY + 60, key="alice", model="qwen", status=200, duration_s=4.0, ttft_s=0.3,
               prompt_tokens=20, completion_tokens=2),
        record(time=DAY + 120, key="alice", model="qwen", status=500, duration_s=3.0, ttft_s=None,
               prompt_tokens=None, completion_tokens=None, error="backend_failed"),
        record(time=DAY + 180, key="bob", model="qwen", status=429, duration_s=2.0, ttft_s=0.2,
               prompt_tokens=30, completion_tokens=3, error="rate_limited"),
        # llama, bob: one request
        record(time=DAY + 240, key="bob", model="llama", status=200, duration_s=10.0, ttft_s=1.0,
               prompt_tokens=100, completion_tokens=50),
        # older than any window the tests ask for
        record(time=DAY - 30 * 86400, key="alice", model="qwen", status=200, duration_s=99.0, ttft_s=9.0),
    ]


def test_usage_by_model_key_and_day_with_hand_computed_percentiles(open_log: Callable[..., RequestLog]) -> None:
    log = open_log(clock=lambda: DAY + 3600)  # "now": one hour into the day
    for row in usage_rows():
        log.request_done(row)
    assert log.flush(10)

    by_model = log.usage(7 * 86400, by="model")
    assert [group["model"] for group in by_model] == ["qwen", "llama"]  # busiest first
    qwen, llama = by_model
    assert qwen == {
        "model": "qwen", "requests": 4, "errors": 2, "prompt_tokens": 60, "completion_tokens": 6,
        "duration_p50_s": pytest.approx(2.5),   # 1 2 3 4: halfway between 2 and 3
        "duration_p95_s": pytest.approx(3.85),  # rank 0.95 * 3 = 2.85: 3 + 0.85 * (4 - 3)
        "ttft_p50_s": pytest.approx(0.2),       # 0.1 0.2 0.3 (the missing one is not counted)
        "ttft_p95_s": pytest.approx(0.29),      # rank 0.95 * 2 = 1.9: 0.2 + 0.9 * (0.3 - 0.2)
        "first": DAY - 3600, "last": DAY + 180,
    }
    assert llama["requests"] == 1 and llama["duration_p50_s"] == llama["duration_p95_s"] == 10.0
    assert llama["ttft_p95_s"] == 1.0 and llama["errors"] == 0

    by_key = {group["key"]: group for group in log.usage(7 * 86400, by="key")}
    assert by_key["alice"]["requests"] == 3 and by_key["alice"]["errors"] == 1
    assert by_key["alice"]["duration_p50_s"] == pytest.approx(3.0)  # 1 3 4
    assert by_key["bob"]["requests"] == 2 and by_key["bob"]["prompt_tokens"] == 130
    assert by_key["bob"]["duration_p95_s"] == pytest.approx(2.0 + 0.95 * 8.0)  # 2 10

    by_day = log.usage(7 * 86400, by="day")
    assert [(group["day"], group["requests"]) for group in by_day] == [("2026-11-29", 1), ("2026-11-30", 4)]
    assert by_day[1]["duration_p50_s"] == pytest.approx(3.5)  # 2 3 4 10

    last_hour = log.usage(3600, by="model")  # the window starts at midnight: the 23:00 row is out
    assert [(group["model"], group["requests"]) for group in last_hour] == [("qwen", 3), ("llama", 1)]
    assert log.usage(60 * 86400, by="model")[0]["requests"] == 5  # the month-old row is in
    with pytest.raises(ValueError, match="by: expected one of key, model, day"):
        log.usage(3600, by="route")


def test_usage_and_recent_of_an_empty_log(open_log: Callable[..., RequestLog]) -> None:
    log = open_log()
    assert log.usage(3600, by="day") == [] and log.recent(5) == []


@pytest.mark.parametrize(("text", "seconds"), [
    ("7d", 7 * 86400), ("24h", 86400), ("30m", 1800), ("90s", 90), ("1w", 604800), ("1d12h", 129600),
    ("1.5h", 5400), (" 2H ", 7200),
])
def test_parse_window(text: str, seconds: float) -> None:
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "-1d", "0d", "7 days", "1y", "abc", "1d-2h"])
def test_parse_window_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration like 30m, 24h or 7d"):
        parse_window(text)


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    assert percentile([1.0, 2.0, 4.0], 50) == 2.0 and percentile([1.0, 2.0, 4.0], 75) == 3.0
    assert percentile([float(n) for n in range(1, 11)], 95) == pytest.approx(9.55)


# ----- a failing database --------------------------------------------------------------------------

def test_sqlite_unwritable_then_writable_keeps_requests_unaffected(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxy.request_log")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log's folder should be")
    log = RequestLog(SQLiteStore(blocker / "requests.sqlite3"), keep_days=30, retry_s=FAST_RETRY)
    try:
        started = time.perf_counter()
        for number in range(100):
            log.request_done(record(duration_s=float(number)))
        assert time.perf_counter() - started < 0.1
        wait_until(lambda: log.failures >= 3, what="retries")
        warnings = [entry for entry in caplog.records if entry.levelno == logging.WARNING]
        assert len(warnings) == 1 and str(blocker) in warnings[0].getMessage()  # rate-limited: once a minute
        blocker.unlink()
        assert log.flush(10)
        assert log.written == 100 and log.dropped == 0
        assert any("writing to" in entry.getMessage() and "again" in entry.getMessage() for entry in caplog.records)
    finally:
        log.close()


def test_postgresql_down_or_refusing_never_shows_the_password(postgres_server: PostgresServer,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxy.request_log")
    secret = postgres_server.password
    forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret)}
    database = postgres_server.new_database_name()  # not created yet: the server refuses the connection
    url = postgres_server.url(database)
    log = RequestLog(PostgresStore(url), keep_days=30, retry_s=FAST_RETRY)
    wrong = RequestLog(PostgresStore(postgres_server.url("postgres", password="Wr0ng-pa55")), keep_days=30,
                       retry_s=FAST_RETRY)
    nowhere = RequestLog(PostgresStore(f"postgresql://proxy:{urllib.parse.quote(secret, safe='')}@127.0.0.1:"
                                       f"{free_port()}/x"), keep_days=30, retry_s=FAST_RETRY)
    try:
        for number in range(50):
            log.request_done(record(duration_s=float(number)))
            wrong.request_done(record())
            nowhere.request_done(record())
        wait_until(lambda: min(log.failures, wrong.failures, nowhere.failures) >= 2, timeout_s=20, what="retries")
        with pytest.raises(StoreError) as refused:
            log.usage(3600)
        messages = [str(refused.value), caplog.text, log.store.name, nowhere.store.name,
                    repr([entry.getMessage() for entry in caplog.records])]
        assert "***" in log.store.name and "does not exist" in caplog.text
        assert "password authentication failed" in caplog.text and "Connection refused" in caplog.text
        for text in messages:
            for form in forms | {"Wr0ng-pa55"}:
                assert form not in text

        postgres_server.create_database(database)  # the database appears: the rows waiting are written
        assert log.flush(20)
        assert log.written == 50 and log.dropped == 0 and len(log.recent(100)) == 50
    finally:
        for each in (log, wrong, nowhere):
            each.close(timeout_s=0.5)
    assert nowhere.dropped == 50 and wrong.dropped == 50  # never written: counted at close
    assert all(form not in caplog.text for form in forms)


def test_close_is_bounded_when_the_database_stays_down(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = RequestLog(SQLiteStore(blocker / "requests.sqlite3"), keep_days=30, retry_s=(1.0, 1.0))
    for _ in range(10):
        log.request_done(record())
    started = time.monotonic()
    log.close(timeout_s=0.5)
    assert time.monotonic() - started < 2.5
    assert log.dropped == 10 and log.written == 0


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://proxy:hunter22@db:5432/logs", "postgresql://proxy:***@db:5432/logs"),
    ("postgres://u:p%40ss%2Fw@db/logs?sslmode=require", "postgres://u:***@db/logs?sslmode=require"),
    ("postgresql://db/logs?user=u&password=hunter22", "postgresql://db/logs?user=u&password=***"),
    ("postgresql://u@db/logs", "postgresql://u@db/logs"),
])
def test_masked_url(url: str, shown: str) -> None:
    assert masked_url(url) == shown


# ----- the factory ---------------------------------------------------------------------------------

def test_open_request_log_follows_proxy_request_log(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {}))
    settings = config.proxy
    assert settings.request_log == "sqlite"
    log = open_request_log(settings)
    assert log is not None and isinstance(log.store, SQLiteStore)
    try:
        assert log.store.path == settings.state_dir / "requests.sqlite3"
        log.request_done(record())
        assert log.flush(10) and (settings.state_dir / "requests.sqlite3").is_file()
    finally:
        log.close()
    assert open_request_log(replace(settings, request_log="off")) is None
    elsewhere = open_request_log(replace(settings, request_log=str(tmp_path / "other.db")), write=False)
    assert elsewhere is not None and isinstance(elsewhere.store, SQLiteStore)
    assert elsewhere.recent(5) == [] and not (tmp_path / "other.db").exists()  # reading creates nothing
    remote = open_request_log(replace(settings, request_log="postgresql://u:pw12345@db.example/logs"), write=False)
    assert remote is not None and remote.store.name == "postgresql://u:***@db.example/logs"
