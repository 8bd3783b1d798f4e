"""Where the request log's rows live: the `proxy_requests` schema, declared once, and its two stores,
SQLite (stdlib, WAL mode) and PostgreSQL (psycopg 3). The only place database errors are met:
they leave as `StoreError`, with a PostgreSQL URL's password masked.
"""

from __future__ import annotations

import re
import sqlite3
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg.conninfo import conninfo_to_dict

from proxy.observe import RequestRecord

TABLE = "proxy_requests"
CONNECT_TIMEOUT_S = 5
BUSY_TIMEOUT_S = 5.0  # SQLite: how long a write waits for another writer's lock before it fails (and is retried)
MASK = "***"


@dataclass(frozen=True, slots=True)
class Column:
    """One column of `proxy_requests`: a RequestRecord field, its type in each dialect, and whether it may be NULL."""

    name: str
    sqlite: str
    postgres: str
    null: bool = False


# One row per RequestRecord, field for field; `time` is epoch seconds (UTC), durations are seconds.
COLUMNS = (
    Column("time", "REAL", "DOUBLE PRECISION"),
    Column("key", "TEXT", "TEXT", null=True),
    Column("client", "TEXT", "TEXT"),
    Column("route", "TEXT", "TEXT"),
    Column("dialect", "TEXT", "TEXT"),
    Column("model", "TEXT", "TEXT", null=True),
    Column("status", "INTEGER", "INTEGER"),
    Column("error", "TEXT", "TEXT", null=True),
    Column("waited_s", "REAL", "DOUBLE PRECISION", null=True),
    Column("ttft_s", "REAL", "DOUBLE PRECISION", null=True),
    Column("duration_s", "REAL", "DOUBLE PRECISION"),
    Column("prompt_tokens", "INTEGER", "INTEGER", null=True),
    Column("completion_tokens", "INTEGER", "INTEGER", null=True),
    Column("bytes_in", "INTEGER", "BIGINT"),
    Column("bytes_out", "INTEGER", "BIGINT"),
    Column("stream", "INTEGER", "BOOLEAN"),  # SQLite has no boolean: 0 or 1
    Column("loaded", "INTEGER", "BOOLEAN"),
)
NAMES = tuple(column.name for column in COLUMNS)
BOOLEANS = frozenset(column.name for column in COLUMNS if column.postgres == "BOOLEAN")
INDEXES = {"time": ("time",), "key": ("key", "time"), "model": ("model", "time")}  # what usage and recent filter by

if NAMES != tuple(item.name for item in fields(RequestRecord)):  # fail at import, not at the first write
    raise TypeError(f"{TABLE}'s columns differ from RequestRecord's fields: update COLUMNS")


class StoreError(Exception):
    """The database could not be reached, read or written; the message never holds a password."""


class Store(Protocol):
    """A database holding `proxy_requests`. `connect` is for the one writer thread; reads open their own."""

    name: str  # for messages: a path, or a URL with its password masked

    def scrub(self, text: str) -> str: ...
    def connect(self) -> Writer: ...
    def read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]: ...


class Writer(Protocol):
    """A connection for writing, used by one thread; the schema exists once it is open."""

    def insert(self, records: Sequence[RequestRecord]) -> None: ...
    def delete_before(self, cutoff: float) -> int: ...
    def close(self) -> None: ...


def schema(dialect: str) -> list[str]:
    """Return the statements creating the table and its indexes (each is a no-op when they exist)."""
    key = "id INTEGER PRIMARY KEY" if dialect == "sqlite" else "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    columns = [f"{column.name} {getattr(column, dialect)}{'' if column.null else ' NOT NULL'}" for column in COLUMNS]
    statements = [f"CREATE TABLE IF NOT EXISTS {TABLE} ({', '.join([key, *columns])})"]
    for name, indexed in INDEXES.items():
        statements.append(f"CREATE INDEX IF NOT EXISTS {TABLE}_{name} ON {TABLE} ({', '.join(indexed)})")
    return statements


# ----- SQLite --------------------------------------------------------------------------------------

class SQLiteStore:
    """An SQLite file in WAL mode: the writer appends while readers (the CLI, /usage) read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)

    def scrub(self, text: str) -> str:
        return text  # a file path holds no secret

    def connect(self) -> SQLiteWriter:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open {self.name}: {exc}") from exc
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            # Consistent in WAL mode; only a power cut may lose the last batches, which a log can afford.
            connection.execute("PRAGMA synchronous=NORMAL")
            for statement in schema("sqlite"):
                connection.execute(statement)
        except sqlite3.Error as exc:
            connection.close()
            raise StoreError(f"cannot set up {self.name}: {exc}") from exc
        return SQLiteWriter(connection, self.name)

    def read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        if not self.path.exists():  # nothing was logged yet: reading creates nothing
            return []
        try:
            uri = "file:" + urllib.parse.quote(str(self.path.resolve())) + "?mode=ro"
            connection = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.name}: {exc}") from exc
        try:
            return connection.execute(sql.replace("%s", "?"), params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # the writer has not created it yet
                return []
            raise StoreError(f"cannot read {self.name}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self.name}: {exc}") from exc
        finally:
            connection.close()


class SQLiteWriter:
    def __init__(self, connection: sqlite3.Connection, name: str) -> None:
        self._connection = connection
        self._name = name
        self._insert = f"INSERT INTO {TABLE} ({', '.join(NAMES)}) VALUES ({', '.join('?' * len(NAMES))})"

    def insert(self, records: Sequence[RequestRecord]) -> None:
        try:
            self._connection.execute("BEGIN IMMEDIATE")  # one transaction per batch
            try:
                self._connection.executemany(self._insert, (row(record) for record in records))
                self._connection.execute("COMMIT")
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to {self._name}: {exc}") from exc

    def delete_before(self, cutoff: float) -> int:
        try:
            return self._connection.execute(f"DELETE FROM {TABLE} WHERE time < ?", (cutoff,)).rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"cannot delete old rows from {self._name}: {exc}") from exc

    def close(self) -> None:
        try:
            self._connection.close()
        except sqlite3.Error:
            pass  # closing a broken connection: nothing is left to lose


# ----- PostgreSQL ----------------------------------------------------------------------------------

class PostgresStore:
    """A PostgreSQL database named by a URL; the table is created on first use. The password stays in
    `_url` alone: `name` and every error carry the masked URL."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._secrets = passwords_in(url)
        self.name = self.scrub(url)

    def scrub(self, text: str) -> str:
        """Return text with the URL's password masked wherever it appears (libpq may echo the URL)."""
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def _open(self, *, autocommit: bool) -> psycopg.Connection[tuple[Any, ...]]:
        try:
            return psycopg.connect(self._url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=autocommit,
                                   application_name="model-proxy request log")
        except (psycopg.Error, ValueError) as exc:
            raise StoreError(f"cannot connect to {self.name}: {self.scrub(str(exc).strip())}") from None

    def connect(self) -> PostgresWriter:
        connection = self._open(autocommit=False)
        try:
            with connection.transaction():
                for statement in schema("postgres"):
                    connection.execute(statement)
        except psycopg.Error as exc:
            connection.close()
            raise StoreError(f"cannot set up {TABLE} in {self.name}: {self.scrub(str(exc).strip())}") from None
        return PostgresWriter(connection, self)

    def read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        connection = self._open(autocommit=True)
        try:
            return connection.execute(sql, params).fetchall()
        except psycopg.errors.UndefinedTable:  # nothing was logged yet
            return []
        except psycopg.Error as exc:
            raise StoreError(f"cannot read {self.name}: {self.scrub(str(exc).strip())}") from None
        finally:
            connection.close()


class PostgresWriter:
    def __init__(self, connection: psycopg.Connection[tuple[Any, ...]], store: PostgresStore) -> None:
        self._connection = connection
        self._store = store
        self._copy = f"COPY {TABLE} ({', '.join(NAMES)}) FROM STDIN"

    def insert(self, records: Sequence[RequestRecord]) -> None:
        try:
            with self._connection.transaction(), self._connection.cursor() as cursor:
                with cursor.copy(self._copy) as copy:  # one COPY per batch: far faster than INSERTs
                    for record in records:
                        copy.write_row(row(record))
        except psycopg.Error as exc:
            raise StoreError(f"cannot write to {self._store.name}: {self._store.scrub(str(exc).strip())}") from None

    def delete_before(self, cutoff: float) -> int:
        try:
            with self._connection.transaction():
                return self._connection.execute(f"DELETE FROM {TABLE} WHERE time < %s", (cutoff,)).rowcount
        except psycopg.Error as exc:
            raise StoreError(f"cannot delete old rows from {self._store.name}: "
                             f"{self._store.scrub(str(exc).strip())}") from None

    def close(self) -> None:
        try:
            self._connection.close()
        except psycopg.Error:
            pass


def passwords_in(url: str) -> list[str]:
    """Return every form the URL's password takes in it (as written and decoded), longest first."""
    found: set[str] = set()
    match = re.match(r"[a-z]+://([^@/?#]*)@", url) or re.match(r"[a-z]+://(.*)@", url)
    if match and ":" in match.group(1):
        written = match.group(1).split(":", 1)[1]
        found.update({written, urllib.parse.unquote(written)})
    for written in re.findall(r"[?&]password=([^&#]*)", url):
        found.update({written, urllib.parse.unquote(written)})
    try:
        parsed = conninfo_to_dict(url).get("password")  # libpq's reading, whatever the URL's oddities
    except (psycopg.Error, ValueError):
        parsed = None
    if parsed:
        found.add(str(parsed))
    return sorted((secret for secret in found if secret), key=len, reverse=True)


def masked_url(url: str) -> str:
    """Return a PostgreSQL URL with its password replaced by ***."""
    return PostgresStore(url).name


def row(record: RequestRecord) -> tuple[Any, ...]:
    """Return a record's values in column order."""
    return tuple(getattr(record, name) for name in NAMES)
