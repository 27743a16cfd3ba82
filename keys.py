"""API keys: creation (shown once), lookup by hash, listing, revocation."""
from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from dataclasses import dataclass

import billing
import policies

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
    # Policies (policies.py); None means none.
    allowed_models: tuple[str, ...] | None = None
    expires_at: float | None = None
    daily_cap: int | None = None
    monthly_cap: int | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(conn: sqlite3.Connection, name: str, credits: int, rpm: int | None = None,
           rpd: int | None = None, **policy: object) -> tuple[int, str]:
    """A new key with its opening grant; returns (id, the key). Only the hash is stored.

    policy takes update()'s policy fields (allowed_models, expires_at, daily_cap, monthly_cap), already parsed.
    Raises ValueError, writing nothing, for credits, limits or policies outside their bounds.
    """
    policy_sets = _policy_columns(policy)
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
        for column, value in policy_sets.items():
            conn.execute(f"UPDATE api_keys SET {column} = ? WHERE id = ?", (value, cur.lastrowid))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return cur.lastrowid, key


# Keys found by lookup(), by hash, for the one connection they were read on. PRAGMA data_version changes whenever
# another connection (another worker, the admin thread, the CLI) commits anything, and then the whole cache is
# dropped; changes made on the cached connection itself go through create/update/revoke below, which drop it
# too. So a cached row is served only while nothing can have changed it: no staleness, a revocation or a new
# limit applies to the next request. Unknown keys are never cached, so random secrets cannot grow it.
_cache: dict[str, ApiKey] = {}
_cached_on: list = [None, None]  # [the connection, its data_version when the cache was filled]
CACHE_MAX = 10_000


def forget() -> None:
    """Drop every cached key (after a change to api_keys made on a connection lookup() may have cached from)."""
    _cache.clear()
    _cached_on[:] = [None, None]


def lookup(conn: sqlite3.Connection, key: str) -> ApiKey | None:
    """The active key with this secret, or None (unknown or revoked)."""
    digest = hash_key(key)
    # The pragma takes and drops the same WAL read lock as the SELECT (2 fcntl, 1 fstat); what a hit saves is the
    # index search and the ApiKey: 10.7 -> 5.5 us a lookup in a loop (docs/performance.md).
    version = conn.execute("PRAGMA data_version").fetchone()[0]
    if _cached_on[0] is conn and _cached_on[1] == version:
        hit = _cache.get(digest)
        if hit is not None:
            return hit
    else:
        _cache.clear()
        _cached_on[:] = [conn, version]
    row = conn.execute("SELECT id, name, prefix, rpm, rpd, allowed_models, expires_at, daily_cap, monthly_cap"
                       " FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (digest,)).fetchone()
    if row is None:
        return None
    found = ApiKey(row[0], row[1], row[2], row[3], row[4], policies.load_allowed(row[5]), row[6], row[7], row[8])
    if len(_cache) >= CACHE_MAX:
        _cache.clear()
    _cache[digest] = found
    return found


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
    forget()
    return cur.rowcount == 1


def list_all(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT id, name, prefix, balance, rpm, rpd, revoked_at FROM api_keys ORDER BY id").fetchall()


POLICY_FIELDS = ("allowed_models", "expires_at", "daily_cap", "monthly_cap")
UPDATABLE = ("name", "rpm", "rpd", *POLICY_FIELDS)


def _policy_columns(policy: dict) -> dict[str, object]:
    """Checked column values for the policy fields given (parsed values: list or None, float, nano-credits)."""
    out: dict[str, object] = {}
    for name, value in policy.items():
        if name not in POLICY_FIELDS:
            raise ValueError(f"unknown policy {name!r}")
        if name == "allowed_models":
            out[name] = None if value is None else json.dumps(policies.parse_allowed_models(value))
        elif name == "expires_at":
            out[name] = policies.parse_expiry(value)
        else:
            if value is not None and (not isinstance(value, int) or not 0 <= value <= billing.MAX_NANO):
                raise ValueError(f"{name} must be 0 to {billing.MAX_CREDITS} credits or none")
            out[name] = value
    return out


def update(conn: sqlite3.Connection, key_id: int, changes: dict[str, object]) -> sqlite3.Row:
    """Change a key's name, limits or policies (parsed values; None clears a limit or policy); returns the row.

    LookupError for an unknown key; ValueError, writing nothing, for a field or value out of bounds. The CLI,
    the admin API and the admin page all change keys here.
    """
    sets: dict[str, object] = {}
    for name, value in changes.items():
        if name not in UPDATABLE:
            raise ValueError(f"{name!r} cannot be changed; changeable: {', '.join(UPDATABLE)}")
        if name == "name":
            if not isinstance(value, str) or not value.strip() or len(value) > 200:
                raise ValueError("name must be a non-empty string of at most 200 characters")
            sets[name] = value.strip()
        elif name in ("rpm", "rpd"):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LIMIT):
                raise ValueError(f"{name} must be 0 (unlimited) to {MAX_LIMIT}, or null for the default")
            sets[name] = value
    sets.update(_policy_columns({k: v for k, v in changes.items() if k in POLICY_FIELDS}))
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)).fetchone() is None:
            raise LookupError(f"no key with id {key_id}")
        for column, value in sets.items():  # column names come from UPDATABLE only
            conn.execute(f"UPDATE api_keys SET {column} = ? WHERE id = ?", (value, key_id))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    finally:
        forget()
    return get(conn, key_id)


_DETAIL = """
    SELECT k.id, k.name, k.prefix, k.balance, k.rpm, k.rpd, k.created_at, k.revoked_at, k.allowed_models,
           k.expires_at, k.daily_cap, k.monthly_cap,
           COALESCE((SELECT SUM(amount) FROM holds h WHERE h.key_id = k.id), 0) AS held,
           COALESCE((SELECT COUNT(*) FROM holds h WHERE h.key_id = k.id), 0) AS in_flight,
           COALESCE((SELECT SUM(cost - uncollected) FROM usage u WHERE u.key_id = k.id AND u.created_at >= ?), 0)
               AS spent_today,
           COALESCE((SELECT SUM(cost - uncollected) FROM usage u WHERE u.key_id = k.id AND u.created_at >= ?), 0)
               AS spent_month
    FROM api_keys k"""


def get(conn: sqlite3.Connection, key_id: int) -> sqlite3.Row:
    """One key with its balance, holds and spend today and this month (UTC); LookupError if there is none."""
    row = conn.execute(_DETAIL + " WHERE k.id = ?",
                       (policies.day_start(), policies.month_start(), key_id)).fetchone()
    if row is None:
        raise LookupError(f"no key with id {key_id}")
    return row


def list_with_balances(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Every key with get()'s columns, by id; each sum reads one key's rows through usage_key_time."""
    return conn.execute(_DETAIL + " ORDER BY k.id", (policies.day_start(), policies.month_start())).fetchall()
