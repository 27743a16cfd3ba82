"""API keys: creation (shown once), lookup by hash, listing, revocation."""
from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass

import billing

PREFIX_LEN = 8


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
    """A new key with its opening grant; returns (id, the key). Only the hash is stored."""
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
    """Add credits; returns the new balance. Raises LookupError for an unknown key."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)).fetchone() is None:
            raise LookupError(f"no key with id {key_id}")
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
