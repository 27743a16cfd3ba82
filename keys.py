"""API keys: creation (shown once), lookup by hash, listing, revocation."""
from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass

import billing

PREFIX_LEN = 8
# The most requests per minute or per day a key may be given (0 already means unlimited).
MAX_LIMIT = 10**9


@dataclass(frozen=True)
class ApiKey:
    id: int
    name: str
    prefix: str
    rpm: int | None
    rpd: int | None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(conn: sqlite3.Connection, name: str, credits: int, rpm: int | None = None,
           rpd: int | None = None) -> tuple[int, str]:
    """A new key with its opening grant; returns (id, the key). Only the hash is stored.

    Raises ValueError, writing nothing, for credits or limits outside their bounds.
    """
    if not 0 <= credits <= billing.MAX_NANO:
        raise ValueError(f"a key holds 0 to {billing.MAX_CREDITS} credits, not {billing.format_credits(credits)}")
    for name_, value in (("rpm", rpm), ("rpd", rpd)):
        if value is not None and not 0 <= value <= MAX_LIMIT:
            raise ValueError(f"{name_} must be 0 (unlimited) to {MAX_LIMIT}, not {value}")
    key = "sk-" + secrets.token_urlsafe(32)
    conn.execute("BEGIN IMMEDIATE")
    try:
        cur = conn.execute(
            "INSERT INTO api_keys(name, key_hash, prefix, balance, rpm, rpd, created_at) VALUES (?, ?, ?, 0, ?, ?, ?)",
            (name, hash_key(key), key[:PREFIX_LEN], rpm, rpd, time.time()))
        billing.credit(conn, cur.lastrowid, credits, "grant")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return cur.lastrowid, key


def lookup(conn: sqlite3.Connection, key: str) -> ApiKey | None:
    """The active key with this secret, or None (unknown or revoked)."""
    row = conn.execute("SELECT id, name, prefix, rpm, rpd FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
                       (hash_key(key),)).fetchone()
    return ApiKey(*row) if row else None


def topup(conn: sqlite3.Connection, key_id: int, amount: int) -> int:
    """Add credits; returns the new balance. Raises LookupError for an unknown key, and ValueError (writing
    nothing) when the balance plus the key's open holds would pass billing.MAX_CREDITS."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT balance + COALESCE((SELECT SUM(amount) FROM holds WHERE key_id = ?), 0)"
                           " FROM api_keys WHERE id = ?", (key_id, key_id)).fetchone()
        if row is None:
            raise LookupError(f"no key with id {key_id}")
        if not isinstance(row[0], int) or row[0] + amount > billing.MAX_NANO:
            room = max(0, billing.MAX_NANO - row[0]) if isinstance(row[0], int) else 0
            raise ValueError(f"key {key_id} has {billing.format_credits(int(row[0]))} credits (with open holds) and "
                             f"can hold at most {billing.MAX_CREDITS}; top it up by at most "
                             f"{billing.format_credits(room)}")
        billing.credit(conn, key_id, amount, "topup")
        balance = conn.execute("SELECT balance FROM api_keys WHERE id = ?", (key_id,)).fetchone()[0]
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return balance


def revoke(conn: sqlite3.Connection, key_id: int) -> bool:
    """Revoke a key; True if it was active."""
    cur = conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), key_id))
    return cur.rowcount == 1


def list_all(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT id, name, prefix, balance, rpm, rpd, revoked_at FROM api_keys ORDER BY id").fetchall()
