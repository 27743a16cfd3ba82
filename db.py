"""SQLite access: one connection per worker process, short write transactions that never freeze the event loop."""
from __future__ import annotations

import os
import random
import re
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

from errors import ConfigError

T = TypeVar("T")
SCHEMA = Path(__file__).with_name("schema.sql")
# How long a write waits for another process's write lock before giving up.
LOCK_WAIT_SECONDS = 10.0
# How long start-up and the command-line tools wait for the database (workers booting together, parallel CLI).
SETUP_WAIT_SECONDS = 30.0
# How often the WAL is copied back into the database, from a thread of its own; past what size a copy that
# fell behind is finished while this process's writers queue; past what size (several processes writing) the
# WAL is truncated whatever it costs them.
CHECKPOINT_SECONDS = 1.0
WAL_RESET_BYTES = 16 * 1024 * 1024
WAL_TRUNCATE_BYTES = 64 * 1024 * 1024

_conns: dict[str, tuple[int, sqlite3.Connection]] = {}
# This process's id, kept current across fork() by the hook below: os.getpid() is a system call (glibc stopped
# caching it), and a hold and its settlement asked for it four times to notice a fork.
_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def pid() -> int:
    """os.getpid(), without the system call."""
    return _pid[0]

_pending: dict[str, list[tuple[Callable[[sqlite3.Connection], Any], AsyncResult]]] = {}
_locks: dict[str, Semaphore] = {}


class DatabaseSetupError(ConfigError):
    """The database cannot be opened or prepared; one sentence naming [server].database and the fix."""


def connect(path: str, busy_seconds: float = 0) -> sqlite3.Connection:
    """A new connection in autocommit mode: every write transaction is an explicit BEGIN IMMEDIATE.

    Workers keep busy_seconds 0: a lock wait inside SQLite's C code would freeze every greenlet of the worker
    for the whole wait (docs/runtime.md, SQLite), so write() below waits cooperatively instead. Tools that may
    block pass a wait; it applies from the first statement, which can already need a lock (a WAL file being
    recovered by another process).
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_seconds)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def conn_for(path: str) -> sqlite3.Connection:
    """The process's shared connection. Greenlets share it safely because nothing yields inside a transaction."""
    pid = _pid[0]
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

    A PASSIVE checkpoint never blocks a writer, but under steady writes it never catches the last frame either,
    and SQLite restarts the WAL from its start only once a checkpoint has copied all of it: the file grew without
    end (hundreds of MB within seconds under load). A TRUNCATE checkpoint fixed the growth but made every writer
    wait while it copied, synced and cut a 16 MB file, which was the p99 at one connection (docs/performance.md).
    So the bulk is copied PASSIVE while writes go on; once the WAL holds more than WAL_RESET_BYTES a second
    PASSIVE pass runs while this process's writers queue (cooperatively, in write()): it copies only the frames
    committed during the first pass, and the next write restarts the WAL at its start, reusing the file instead
    of growing or cutting it. Measured with steady writes: writers queued 5 to 22 ms (mostly the database fsync)
    about once a second, against 40 to 53 ms every two seconds for TRUNCATE. Other processes' writes can spoil
    the catch-up; past WAL_TRUNCATE_BYTES the TRUNCATE remains the backstop.
    """
    pool = ThreadPool(1)  # not the hub's pool, which resolves DNS (docs/runtime.md, "gevent", DNS)
    holder: list[sqlite3.Connection] = []
    wal = path + "-wal"

    def checkpoint(mode: str) -> tuple[int, int]:
        """(frames in the WAL when the pass began, frames copied into the database)."""
        if not holder:  # made in the pool's thread, used only there
            holder.append(sqlite3.connect(path, isolation_level=None, timeout=LOCK_WAIT_SECONDS))
        _, frames, copied = holder[0].execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return frames, copied

    page = conn_for(path).execute("PRAGMA page_size").fetchone()[0]
    while True:
        gevent.sleep(CHECKPOINT_SECONDS)
        try:
            size = os.path.getsize(wal) if os.path.exists(wal) else 0
            if size > WAL_TRUNCATE_BYTES:
                pool.apply(checkpoint, ("TRUNCATE",))
                continue
            # frames is the WAL's length when the pass began: writes during the pass are not in it, so even a
            # pass that copied all of them leaves the WAL behind, and only a pass nobody writes during resets it.
            frames, _ = pool.apply(checkpoint, ("PASSIVE",))
            if frames * page > WAL_RESET_BYTES:
                with _locks.setdefault(path, Semaphore()):  # this process's writes wait for the short catch-up
                    pool.apply(checkpoint, ("PASSIVE",))
        except sqlite3.Error:
            pass  # busy or locked: the next round catches up


def _applied(conn: sqlite3.Connection, schema: str) -> bool:
    """Whether schema.sql is already in the file (WAL on, its tables and user_version there), found by reads only,
    so that start-up and every CLI command need no write lock on a database that is ready."""
    if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        return False
    wanted = set(re.findall(r"CREATE\s+(?:TABLE|INDEX)\s+IF\s+NOT\s+EXISTS\s+(\w+)", schema, re.IGNORECASE))
    have = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    version = re.search(r"PRAGMA\s+user_version\s*=\s*(\d+)", schema, re.IGNORECASE)
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    return wanted <= have and (version is None or current == int(version.group(1))) and current >= SCHEMA_VERSION


def init(path: str, wait_seconds: float | None = None) -> None:
    """Create the database file and apply schema.sql (idempotent); safe with any number of processes at once.

    Raises DatabaseSetupError with one sentence for a path that cannot be a database, or a lock held longer
    than wait_seconds. Switching to WAL can answer "locked" without SQLite's busy handler ever waiting (two
    processes creating the file together), so lock errors are retried here until the deadline.
    """
    where = f"[server].database = {path!r}"
    target = Path(path)
    if target.is_dir():
        inside = str(target / "gateway.db")
        raise DatabaseSetupError(f"{where} is a directory; name a file inside it, such as {inside!r}.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseSetupError(f"{where}: its directory {str(target.parent)!r} cannot be created "
                                 f"({exc.strerror}); create it or choose a writable path.") from None
    wait_seconds = SETUP_WAIT_SECONDS if wait_seconds is None else wait_seconds
    schema = SCHEMA.read_text()
    deadline = time.monotonic() + wait_seconds
    delay = 0.01
    while True:
        try:
            conn = connect(path, busy_seconds=max(0.0, min(5.0, deadline - time.monotonic())))
            try:
                if not _applied(conn, schema):
                    conn.executescript(schema)  # sets WAL, which is persistent in the file
                    migrate(conn)  # columns added since an older release made the file
            finally:
                conn.close()
            return
        except sqlite3.OperationalError as exc:
            if _locked(exc) and time.monotonic() < deadline:
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.2)
                continue
            if _locked(exc):
                raise DatabaseSetupError(f"{where} stayed locked by another process for {wait_seconds:g} s; "
                                         "nothing was written; try again when it is done.") from None
            raise DatabaseSetupError(f"{where} cannot be opened ({exc}); make it a writable file path.") from None
        except sqlite3.DatabaseError as exc:
            raise DatabaseSetupError(f"{where} is not a usable SQLite database ({exc}); point it at a new file "
                                     "or restore the right one.") from None


# Columns added to tables of an existing database, in order; schema.sql creates new databases with them.
_MIGRATIONS: list[tuple[int, str, str, str]] = [
    (2, "holds", "pid_started", "INTEGER"),
    (2, "holds", "host", "TEXT"),
    (2, "holds", "boot_id", "TEXT"),
    (3, "api_keys", "allowed_models", "TEXT"),
    (3, "api_keys", "expires_at", "REAL"),
    (3, "api_keys", "daily_cap", "INTEGER CHECK (daily_cap IS NULL OR daily_cap >= 0)"),
    (3, "api_keys", "monthly_cap", "INTEGER CHECK (monthly_cap IS NULL OR monthly_cap >= 0)"),
]
SCHEMA_VERSION = 3


def _rebuild_ledger(conn: sqlite3.Connection) -> None:
    """Version 3: the ledger takes 'correction' rows with a reason. SQLite cannot change a CHECK in place,
    so a ledger made before is copied into a new table (inside migrate's transaction)."""
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'ledger'").fetchone()
    if sql is None or "correction" in sql[0]:
        return
    conn.execute("""CREATE TABLE ledger_v3 (
        id INTEGER PRIMARY KEY, key_id INTEGER NOT NULL REFERENCES api_keys(id), amount INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('grant', 'topup', 'charge', 'correction')), request_id TEXT,
        created_at REAL NOT NULL, reason TEXT)""")
    conn.execute("INSERT INTO ledger_v3(id, key_id, amount, kind, request_id, created_at)"
                 " SELECT id, key_id, amount, kind, request_id, created_at FROM ledger")
    conn.execute("DROP TABLE ledger")
    conn.execute("ALTER TABLE ledger_v3 RENAME TO ledger")


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
        _rebuild_ledger(conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def write(path: str, work: Callable[[sqlite3.Connection], T], gather: bool = True) -> T:
    """Run work(conn) atomically and durably (as SQLite's WAL counts durable), and return what it returned.

    Group commit: writes that arrive while one is being gathered share one BEGIN IMMEDIATE ... COMMIT, each in
    its own SAVEPOINT, so one that raises is undone alone; every caller returns only after the COMMIT that
    holds its work. A commit writes every page it touched to the WAL, and at 16 connections this turns about
    two commits per request into a fraction of one.

    gather=False skips the yield that lets ready greenlets join: for a caller that knows no other request of
    this worker is in flight (billing at one connection), where the yield was a trip round the event loop
    that nothing could join.

    work must not yield to the event loop (no network, no gevent calls): other greenlets share the connection.
    """
    pending = _pending.get(path)
    done: AsyncResult = AsyncResult()
    if pending is not None:  # a batch is being gathered: join it and wait for its commit
        pending.append((work, done))
        return done.get()
    _pending[path] = [(work, done)]
    if gather:
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
            # Another worker's transaction lasts well under a millisecond; backing off to 50 ms left the lock
            # idle while this worker's batch slept (WORKERS=2 with Redis limits, 16 conns: 209 -> 286 req/s,
            # p99 245 -> 158 ms, A/B on a loaded machine).
            delay = min(delay * 2, 0.004)


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
    """A connection for command-line tools, where blocking on a lock (up to SETUP_WAIT_SECONDS) is fine."""
    init(path)
    conn = connect(path, busy_seconds=SETUP_WAIT_SECONDS)
    try:
        yield conn
    finally:
        conn.close()
