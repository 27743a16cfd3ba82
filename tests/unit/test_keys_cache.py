"""keys.lookup's per-process cache: never serves a key past a change to it, from any connection."""
from __future__ import annotations

import db
import keys


def _setup(tmp_path):
    path = str(tmp_path / "k.db")
    with db.cli_connection(path) as conn:
        key_id, secret = keys.create(conn, "x", 100, rpm=5)
    return path, key_id, secret


def test_a_cached_key_is_revoked_and_changed_at_once_from_another_connection(tmp_path):
    path, key_id, secret = _setup(tmp_path)
    conn = db.conn_for(path)
    first = keys.lookup(conn, secret)
    assert first is not None and first.rpm == 5
    assert keys.lookup(conn, secret) is first  # served from the cache while nothing changed
    # The worker's own hold/settle writes (balance only) leave the cache valid.
    db.write(path, lambda c: c.execute("UPDATE api_keys SET balance = balance - 1 WHERE id = ?", (key_id,)))
    assert keys.lookup(conn, secret) is first
    # Another process (a second worker, the CLI) changes the row: plain SQL on a connection of its own, so nothing
    # in this process is told about it.
    with db.cli_connection(path) as other:
        other.execute("UPDATE api_keys SET rpm = 7, allowed_models = '[\"m1\"]' WHERE id = ?", (key_id,))
    changed = keys.lookup(conn, secret)
    assert changed is not first and changed.rpm == 7 and changed.allowed_models == ("m1",)
    with db.cli_connection(path) as other:
        other.execute("UPDATE api_keys SET revoked_at = 1 WHERE id = ?", (key_id,))
    assert keys.lookup(conn, secret) is None
    assert keys.lookup(conn, secret) is None


def test_changes_on_the_cached_connection_itself_apply_at_once(tmp_path):
    path, key_id, secret = _setup(tmp_path)
    conn = db.conn_for(path)
    assert keys.lookup(conn, secret).rpm == 5
    keys.update(conn, key_id, {"rpm": 9})
    assert keys.lookup(conn, secret).rpm == 9
    assert keys.revoke(conn, key_id)
    assert keys.lookup(conn, secret) is None


def test_unknown_keys_are_not_cached(tmp_path):
    path, _, secret = _setup(tmp_path)
    conn = db.conn_for(path)
    keys.lookup(conn, secret)
    size = len(keys._cache)
    for i in range(50):
        assert keys.lookup(conn, f"sk-unknown-{i}") is None
    assert len(keys._cache) == size
