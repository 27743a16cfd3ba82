"""Money: prices, holds, settlement, the ledger and its audit. Integer nano-credits only; no float touches money."""
from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import db
from config import NANO, ModelConfig
from errors import InsufficientCredits

MILLION = 1_000_000
# The most credits a key may hold, be given or be topped up with: 10^18 nano-credits, far inside SQLite's signed
# 64-bit integers, so a balance plus its open holds and a ledger sum can never overflow into a REAL.
MAX_CREDITS = 10**9
MAX_NANO = MAX_CREDITS * NANO


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def token_cost(model: ModelConfig, prompt_tokens: int, completion_tokens: int) -> int:
    """Exact cost in nano-credits, rounded up to a whole nano-credit."""
    return ceil_div(prompt_tokens * model.input_npm + completion_tokens * model.output_npm, MILLION)


def format_credits(nano: int) -> str:
    """A plain decimal with at most 9 places: 15600 -> '0.0000156', 5*10**9 -> '5'."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO)
    text = f"{whole}.{frac:09d}".rstrip("0").rstrip(".")
    return sign + text


def parse_credits(text: str | int | Decimal) -> int:
    """Credits written as a decimal ('0.5', '10') to nano-credits; refuses negatives, sub-nano precision and
    more than MAX_CREDITS. The ValueError's text completes "AMOUNT credits ..." style sentences for the CLI."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number of credits") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"{text!r} must be zero or more credits")
    if value > MAX_CREDITS:
        raise ValueError(f"{text!r} is more than the {MAX_CREDITS} credits a key can hold")
    nano = value * NANO
    if nano != nano.to_integral_value():
        raise ValueError(f"{text!r} has more than 9 decimal places")
    return int(nano)


@dataclass
class Hold:
    id: int
    key_id: int
    request_id: str
    amount: int
    plan: Any = None  # what the planner decided (for example the output cap it could afford)


@dataclass
class Charge:
    """One usage row to write at settlement; a request may settle several (a vision bridge call, the main call)."""

    route: str
    model: str
    cost: int
    status: int
    request_id: str
    parent_request_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    units: float = 0
    estimated: bool = False
    latency_ms: int = 0
    uncollected: int = field(default=0, init=False)


def hold(path: str, key_id: int, request_id: str, planner: Callable[[int], tuple[int, Any]]) -> Hold:
    """Reserve credits before any upstream call: planner(balance) -> (amount, plan), or raises InsufficientCredits.

    The planner runs inside the write transaction, so the balance it sees is the balance it debits.
    """
    def work(conn: sqlite3.Connection) -> Hold:
        row = conn.execute("SELECT balance FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        balance = row[0] if row else 0
        amount, plan = planner(balance)
        if amount > balance:
            raise InsufficientCredits("This key does not have enough credits for this request.")
        conn.execute("UPDATE api_keys SET balance = balance - ? WHERE id = ?", (amount, key_id))
        cur = conn.execute(
            "INSERT INTO holds(key_id, request_id, pid, amount, created_at) VALUES (?, ?, ?, ?, ?)",
            (key_id, request_id, os.getpid(), amount, time.time()))
        return Hold(cur.lastrowid, key_id, request_id, amount, plan)
    return db.write(path, work)


def settle(path: str, h: Hold, charges: list[Charge]) -> int | None:
    """Charge what the request really cost and return the rest of its hold; idempotent. Returns the new balance.

    A cost above the hold is taken from the balance down to zero; what cannot be collected is recorded on the
    last usage row, so the balance never goes negative and no charge is lost from the books.
    """
    def work(conn: sqlite3.Connection) -> int | None:
        now = time.time()
        if conn.execute("DELETE FROM holds WHERE id = ?", (h.id,)).rowcount != 1:
            return None  # already settled, or returned at start-up
        total = sum(c.cost for c in charges)
        if total <= h.amount:
            (balance,) = conn.execute("UPDATE api_keys SET balance = balance + ? WHERE id = ? RETURNING balance",
                                      (h.amount - total, h.key_id)).fetchone()
        else:
            (balance,) = conn.execute("SELECT balance FROM api_keys WHERE id = ?", (h.key_id,)).fetchone()
            taken = min(balance, total - h.amount)
            balance -= taken
            conn.execute("UPDATE api_keys SET balance = ? WHERE id = ?", (balance, h.key_id))
            charges[-1].uncollected = total - h.amount - taken
        for c in charges:
            conn.execute(
                "INSERT INTO usage(request_id, parent_request_id, key_id, route, model, prompt_tokens,"
                " completion_tokens, units, estimated, cost, uncollected, status, latency_ms, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (c.request_id, c.parent_request_id, h.key_id, c.route, c.model, c.prompt_tokens,
                 c.completion_tokens, c.units, int(c.estimated), c.cost, c.uncollected, c.status,
                 c.latency_ms, now))
            conn.execute("INSERT INTO ledger(key_id, amount, kind, request_id, created_at)"
                         " VALUES (?, ?, 'charge', ?, ?)", (h.key_id, -(c.cost - c.uncollected), c.request_id, now))
        return balance
    return db.write(path, work)


def fixed(amount: int, what: str, hint: str) -> Callable[[int], tuple[int, None]]:
    """A hold planner for a known price: the amount, or 402 saying what the key has and what `what` needs."""
    def plan(balance: int) -> tuple[int, None]:
        if amount > balance:
            raise InsufficientCredits(f"This key has {format_credits(balance)} credits; {what} need "
                                      f"{format_credits(amount)}. Top up the key or {hint}.")
        return amount, None
    return plan


def release_orphans(path: str, ttl_seconds: float) -> int:
    """Return holds whose worker process is gone (or that outlived any request) to their keys."""
    def work(conn: sqlite3.Connection) -> int:
        now = time.time()
        rows = conn.execute("SELECT id, key_id, amount, pid, created_at FROM holds").fetchall()
        released = 0
        for hold_id, key_id, amount, pid, created_at in rows:
            if _alive(pid) and now - created_at < ttl_seconds:
                continue
            conn.execute("DELETE FROM holds WHERE id = ?", (hold_id,))
            conn.execute("UPDATE api_keys SET balance = balance + ? WHERE id = ?", (amount, key_id))
            released += 1
        return released
    return db.write(path, work)


def _alive(pid: int) -> bool:
    """Whether the process that took a hold can still settle it (a zombie cannot)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def credit(conn: sqlite3.Connection, key_id: int, amount: int, kind: str) -> None:
    """Add credits to a key with its ledger row, inside the caller's transaction."""
    conn.execute("UPDATE api_keys SET balance = balance + ? WHERE id = ?", (amount, key_id))
    conn.execute("INSERT INTO ledger(key_id, amount, kind, created_at) VALUES (?, ?, ?, ?)",
                 (key_id, amount, kind, time.time()))


def audit(conn: sqlite3.Connection) -> list[tuple[int, int, int, int]]:
    """Keys whose balance plus open holds differs from the sum of their ledger: (id, balance, held, ledger)."""
    rows = conn.execute("""
        SELECT k.id, k.balance, COALESCE(h.total, 0), COALESCE(l.total, 0)
        FROM api_keys k
        LEFT JOIN (SELECT key_id, SUM(amount) AS total FROM holds GROUP BY key_id) h ON h.key_id = k.id
        LEFT JOIN (SELECT key_id, SUM(amount) AS total FROM ledger GROUP BY key_id) l ON l.key_id = k.id
        ORDER BY k.id""").fetchall()
    return [tuple(r) for r in rows if r[1] + r[2] != r[3]]
