"""SQLite access: one connection per worker process, short write transactions that never freeze the event loop."""
from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import gevent
from gevent.event import AsyncResult
from gevent.lock import Semaphore
from gevent.threadpool import ThreadPool

T = TypeVar("T")
SCHEMA = Path(__file__).with_name("schema.sql")
# How long a write waits for another process's write lock before giving up.
LOCK_WAIT_SECONDS = 10.0
# How often the WAL is copied back into the database, from a thread of its own, and past what size it is cut.
CHECKPOINT_SECONDS = 1.0
WAL_TRUNCATE_BYTES = 16 * 1024 * 1024

_conns: dict[str, tuple[int, sqlite3.Connection]] = {}
_pending: dict[str, list[tuple[Callable[[sqlite3.Connection], Any], AsyncResult]]] = {}
_locks: dict[str, Semaphore] = {}


def connect(path: str) -> sqlite3.Connection:
    """A new connection in autocommit mode: every write transaction is an explicit BEGIN IMMEDIATE."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    # busy_timeout 0: a lock wait inside SQLite's C code would freeze every greenlet of the worker
    # (RUNTIME.md 3.1 measured 2 s); write() below waits cooperatively instead.
    conn.execute("PRAGMA busy_timeout=0")
    return conn


def conn_for(path: str) -> sqlite3.Connection:
    """The process's shared connection. Greenlets share it safely because nothing yields inside a transaction."""
    pid = os.getpid()
    entry = _conns.get(path)
    if entry is None or entry[0] != pid:
        conn = connect(path)
        # SQLite's automatic checkpoint runs inside whichever commit crosses 1000 WAL pages and fsyncs the
        # database there, freezing every greenlet of the worker; a thread does it instead (_checkpoints).
        conn.execute("PRAGMA wal_autocheckpoint=0")
        entry = (pid, conn)
        _conns[path] = entry
        gevent.spawn(_checkpoints, path)
    return entry[1]


def _checkpoints(path: str) -> None:
    """Copy the WAL into the database every CHECKPOINT_SECONDS, in a real OS thread off the event loop.

    Under steady writes a PASSIVE checkpoint never catches the last frame, so the WAL is never restarted and
    grows (358 MB after 10 s at 830 requests/s). Past WAL_TRUNCATE_BYTES the thread waits for writers, copies
    everything and truncates the file; writers meanwhile wait cooperatively in write().
    """
    pool = ThreadPool(1)  # not the hub's pool, which resolves DNS (RUNTIME.md 2.4)
    holder: list[sqlite3.Connection] = []
    wal = path + "-wal"

    def checkpoint() -> None:
        if not holder:  # made in the pool's thread, used only there
            holder.append(sqlite3.connect(path, isolation_level=None, timeout=LOCK_WAIT_SECONDS))
        big = os.path.exists(wal) and os.path.getsize(wal) > WAL_TRUNCATE_BYTES
        holder[0].execute("PRAGMA wal_checkpoint(TRUNCATE)" if big else "PRAGMA wal_checkpoint(PASSIVE)")

    while True:
        gevent.sleep(CHECKPOINT_SECONDS)
        try:
            pool.apply(checkpoint)
        except sqlite3.Error:
            pass  # busy or locked: the next round catches up


def init(path: str) -> None:
    """Create the database file and apply schema.sql (idempotent)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    try:
        conn.execute("PRAGMA busy_timeout=10000")
        conn.executescript(SCHEMA.read_text())  # sets WAL, which is persistent in the file
        migrate(conn)
    finally:
        conn.close()


# Columns added to tables of an existing database, in order; schema.sql creates new databases with them.
_MIGRATIONS: list[tuple[int, str, str, str]] = [
    (2, "holds", "pid_started", "INTEGER"),
    (2, "holds", "host", "TEXT"),
    (2, "holds", "boot_id", "TEXT"),
]
SCHEMA_VERSION = 2


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a database made by an older release up to SCHEMA_VERSION (each step idempotent)."""
    if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for _, table, column, kind in _MIGRATIONS:
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def write(path: str, work: Callable[[sqlite3.Connection], T]) -> T:
    """Run work(conn) atomically and durably (as SQLite's WAL counts durable), and return what it returned.

    Group commit: writes that arrive while one is being gathered share one BEGIN IMMEDIATE ... COMMIT, each in
    its own SAVEPOINT, so one that raises is undone alone; every caller returns only after the COMMIT that
    holds its work. A commit writes every page it touched to the WAL, and at 16 connections this turns about
    two commits per request into a fraction of one.

    work must not yield to the event loop (no network, no gevent calls): other greenlets share the connection.
    """
    pending = _pending.get(path)
    done: AsyncResult = AsyncResult()
    if pending is not None:  # a batch is being gathered: join it and wait for its commit
        pending.append((work, done))
        return done.get()
    _pending[path] = [(work, done)]
    gevent.sleep(0)  # lead the batch: greenlets that are ready now run, and their writes join it
    with _locks.setdefault(path, Semaphore()):  # one transaction at a time on the shared connection
        _run(path, _pending.pop(path))
    return done.get()  # already set: returns at once


def _run(path: str, batch: list[tuple[Callable[[sqlite3.Connection], Any], AsyncResult]]) -> None:
    """One transaction for a batch of writes; every write's result or exception goes to its AsyncResult."""
    conn = conn_for(path)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    try:
        _begin(conn, deadline)
    except BaseException as exc:
        for _, done in batch:
            done.set_exception(exc)
        return
    outcomes = []
    try:
        if len(batch) == 1:
            work, done = batch[0]
            outcomes.append((done, work(conn), None))
        else:
            for work, done in batch:
                conn.execute("SAVEPOINT w")
                try:
                    outcomes.append((done, work(conn), None))
                    conn.execute("RELEASE w")
                except Exception as exc:
                    conn.execute("ROLLBACK TO w")
                    conn.execute("RELEASE w")
                    outcomes.append((done, None, exc))
        _commit(conn, deadline)
    except BaseException as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        for _, done in batch:
            done.set_exception(exc)
        return
    for done, result, exc in outcomes:
        if exc is None:
            done.set(result)
        else:
            done.set_exception(exc)


def _begin(conn: sqlite3.Connection, deadline: float) -> None:
    """BEGIN IMMEDIATE, waiting for another process's write lock by sleeping the greenlet, never the loop."""
    delay = 0.001
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _locked(exc) or time.monotonic() > deadline:
                raise
            gevent.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.05)


def _commit(conn: sqlite3.Connection, deadline: float) -> None:
    while True:
        try:
            conn.execute("COMMIT")
            return
        except sqlite3.OperationalError as exc:
            if not _locked(exc) or time.monotonic() > deadline:
                conn.execute("ROLLBACK")
                raise
            gevent.sleep(0.002)


def read(path: str, sql: str, args: tuple = ()) -> list[sqlite3.Row | tuple]:
    """A read outside any transaction; WAL readers never wait for writers."""
    return conn_for(path).execute(sql, args).fetchall()


@contextmanager
def cli_connection(path: str) -> Iterator[sqlite3.Connection]:
    """A connection for command-line tools, where blocking on a lock is fine."""
    init(path)
    conn = connect(path)
    conn.execute("PRAGMA busy_timeout=10000")
    try:
        yield conn
    finally:
        conn.close()
