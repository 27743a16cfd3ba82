"""db.write's group commit: concurrent writes share a transaction, and a write that raises is undone alone."""
from __future__ import annotations

import gevent
import pytest

import db
import keys
from errors import InsufficientCreditsError


def test_group_commit_undoes_only_the_failing_writes(tmp_path):
    path = str(tmp_path / "t.db")
    with db.cli_connection(path) as conn:
        key_id, _ = keys.create(conn, "x", 100)
    transactions = []

    def take(amount: int) -> int:
        def work(conn):
            transactions.append(conn.in_transaction)
            (balance,) = conn.execute("SELECT balance FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if balance < amount:
                raise InsufficientCreditsError("short")
            conn.execute("UPDATE api_keys SET balance = balance - ? WHERE id = ?", (amount, key_id))
            conn.execute("INSERT INTO ledger(key_id, amount, kind, created_at) VALUES (?, ?, 'charge', 0)",
                         (key_id, -amount))
            return balance - amount
        return db.write(path, work)

    greenlets = [gevent.spawn(take, 30) for _ in range(5)]
    gevent.joinall(greenlets)
    assert sorted(g.value for g in greenlets if g.successful()) == [10, 40, 70]
    failures = [g.exception for g in greenlets if not g.successful()]
    assert len(failures) == 2 and all(isinstance(e, InsufficientCreditsError) for e in failures)
    assert transactions == [True] * 5
    with db.cli_connection(path) as conn:
        assert conn.execute("SELECT balance FROM api_keys").fetchone()[0] == 10
        assert conn.execute("SELECT COUNT(*) FROM ledger WHERE kind = 'charge'").fetchone()[0] == 3


def test_a_lone_write_that_raises_leaves_nothing(tmp_path):
    path = str(tmp_path / "t.db")
    with db.cli_connection(path) as conn:
        key_id, _ = keys.create(conn, "x", 100)

    def work(conn):
        conn.execute("UPDATE api_keys SET balance = 0 WHERE id = ?", (key_id,))
        raise ValueError("boom")

    with pytest.raises(ValueError):
        db.write(path, work)
    assert db.write(path, lambda conn: conn.execute("SELECT balance FROM api_keys").fetchone()[0]) == 100


def test_writes_that_do_not_gather_are_still_each_atomic_and_all_applied(tmp_path):
    # gather=False (billing with no other request in flight) skips the yield, not the transaction or the lock.
    path = str(tmp_path / "t.db")
    with db.cli_connection(path) as conn:
        key_id, _ = keys.create(conn, "x", 100)

    def take(amount: int, gather: bool) -> int:
        def work(conn):
            assert conn.in_transaction
            conn.execute("UPDATE api_keys SET balance = balance - ? WHERE id = ?", (amount, key_id))
            return conn.execute("SELECT balance FROM api_keys WHERE id = ?", (key_id,)).fetchone()[0]
        return db.write(path, work, gather=gather)

    greenlets = [gevent.spawn(take, 10, i % 2 == 0) for i in range(6)]
    gevent.joinall(greenlets)
    assert sorted(g.value for g in greenlets) == [40, 50, 60, 70, 80, 90]
    assert db.write(path, lambda conn: conn.execute("SELECT balance FROM api_keys").fetchone()[0],
                    gather=False) == 40


def test_pid_and_upstream_pools_follow_fork() -> None:
    """db.pid() is the process's id in a forked child, not the parent's; and the child starts with no upstream
    pools (a pooled socket shared with the parent would interleave two processes' requests)."""
    import os

    from config import UpstreamConfig
    from providers import http as upstream_http
    upstream = UpstreamConfig(name="forktest", kind="openai", base_url="http://127.0.0.1:9/v1")
    parent_pool = upstream_http.pool(upstream)
    assert db.pid() == os.getpid() and upstream_http.pool(upstream) is parent_pool
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child's outcome is read from the pipe)
        ok = db.pid() == os.getpid() != 0 and not upstream_http._pools
        ok = ok and upstream_http.pool(upstream) is not parent_pool
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1"
    finally:
        os.close(read)
        os.waitpid(child, 0)
    assert db.pid() == os.getpid() and upstream_http.pool(upstream) is parent_pool
