"""Credits stay exact in the pure parts: usage parsing, token costs, prompt counting, settlement retries, orphan
holds, migrations and the hold ttl."""
from __future__ import annotations

import os
import sqlite3
import time
from decimal import ROUND_CEILING, Decimal

import pytest

import billing
import config
import db
import keys
import tokens

NANO = 10**9


def cost(p: int, c: int, cached: int = 0, inp: str = "0.40", out: str = "1.60", cin: str = "0.10") -> int:
    """Expected nano-credits, computed independently of billing.py (prices per million tokens)."""
    exact = (Decimal(p - cached) * Decimal(inp) + Decimal(cached) * Decimal(cin) + Decimal(c) * Decimal(out)) \
        / Decimal(10**6) * NANO
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


# --- pure functions -------------------------------------------------------------------------------------------

def test_read_usage_trusts_only_sane_integers():
    U = billing.Usage
    assert billing.read_usage({"prompt_tokens": 10, "completion_tokens": 5}) == U(10, 5)
    assert billing.read_usage({"prompt_tokens": 10, "completion_tokens": 5,
                               "prompt_tokens_details": {"cached_tokens": 4},
                               "completion_tokens_details": {"reasoning_tokens": 3}}) == U(10, 5, 4, 3)
    # cached beyond the prompt is clamped; a cached count that is not a sane integer is no discount at all
    assert billing.read_usage({"prompt_tokens": 10, "completion_tokens": 5,
                               "prompt_tokens_details": {"cached_tokens": 99}}) == U(10, 5, 10)
    for bad in (-3, True, 1.5, "4", None, 10**12):
        assert billing.read_usage({"prompt_tokens": 10, "completion_tokens": 5,
                                   "prompt_tokens_details": {"cached_tokens": bad}}) == U(10, 5)
    for bad in (-1, True, False, 1.0, 1e30, float("inf"), float("nan"), "12", None, [], 10**11):
        assert billing.read_usage({"prompt_tokens": bad, "completion_tokens": 5}) is None
        assert billing.read_usage({"prompt_tokens": 5, "completion_tokens": bad}) is None
        assert billing.read_usage({"promptTokenCount": bad, "candidatesTokenCount": 5}) is None
    assert billing.read_usage({"prompt_tokens": 5}) is None
    for bad in (None, [], "usage", 5):
        assert billing.read_usage(bad) is None
    # Gemini's usageMetadata: thoughts are output on top of the candidates
    assert billing.read_usage({"promptTokenCount": 100, "candidatesTokenCount": 20, "thoughtsTokenCount": 30,
                               "cachedContentTokenCount": 60, "totalTokenCount": 150}) == U(100, 50, 60, 30)
    assert billing.read_usage({"promptTokenCount": 7}) == U(7, 0)


def test_token_cost_prices_cached_tokens_and_is_never_negative():
    raw = {"upstream": "u", "input_price": Decimal("0.40"), "output_price": Decimal("1.60")}
    plain = config.ModelConfig(id="m", upstream_model="m", **raw)
    cheap = config.ModelConfig(id="m", upstream_model="m", cached_input_price=Decimal("0.10"), **raw)
    assert billing.token_cost(cheap, 1000, 10, 600) == cost(1000, 10, 600)
    assert billing.token_cost(plain, 1000, 10, 600) == cost(1000, 10)  # no cached price: input price
    assert billing.token_cost(cheap, 100, 0, 500) == cost(100, 0, 100)  # clamped to the prompt
    assert billing.token_cost(cheap, -10**9, -10**9) == 0


def test_completion_prompt_counts_without_recursion_and_refuses_deep_nesting(count_tokens):
    assert tokens.completion_prompt([[1, 2, 3], [4]]) == 4
    assert tokens.completion_prompt(["ab\ud800", [5]]) == tokens.estimate("ab\ud800") + 1
    assert tokens.count("a\ud800b") > 0 and tokens.estimate("\ud800") == 1
    deep: list = []
    for _ in range(50):  # deeper than any prompt shape, within the body parser's own depth limit
        deep = [deep]
    with pytest.raises(Exception) as exc:
        tokens.completion_prompt(deep)
    assert exc.value.status == 400 and exc.value.param == "prompt"


# --- usage an upstream reports ---------------------------------------------------------------------------------

# --- broken streams and the usage chunk --------------------------------------------------------------------------

# --- malformed answers and hostile input ------------------------------------------------------------------------

# --- settlement and holds ----------------------------------------------------------------------------------------

def test_settle_is_safe_to_retry(tmp_path):
    path = str(tmp_path / "t.db")
    with db.cli_connection(path) as conn:
        key_id, _ = keys.create(conn, "x", 1000)
    h = billing.hold(path, key_id, "req_1", lambda balance: (300, None))
    charge = billing.Charge("chat.completions", "m", -50, 200, "req_1")  # a negative cost is charged as 0
    assert billing.settle(path, h, [charge]) == 1000
    assert billing.settle(path, h, [charge]) is None and billing.release(path, h) is False
    with db.cli_connection(path) as conn:
        assert conn.execute("SELECT balance FROM api_keys").fetchone()[0] == 1000
        assert conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 1
        assert billing.audit(conn) == []


def _hold_row(conn, key_id: int, pid: int, started: int | None, host: str | None, boot: str | None,
              amount: int = 10, age: float = 0) -> None:
    conn.execute("UPDATE api_keys SET balance = balance - ? WHERE id = ?", (amount, key_id))
    conn.execute("INSERT INTO holds(key_id, request_id, pid, pid_started, host, boot_id, amount, created_at)"
                 " VALUES (?, 'r', ?, ?, ?, ?, ?, ?)", (key_id, pid, started, host, boot, amount, time.time() - age))


def test_release_orphans_frees_only_holds_whose_owner_is_gone(tmp_path):
    path = str(tmp_path / "t.db")
    host, boot, started = billing.owner()
    dead = 2**22 + 12345  # above pid_max's default: no such process
    with db.cli_connection(path) as conn:
        key_id, _ = keys.create(conn, "x", 1000)
        _hold_row(conn, key_id, os.getpid(), started, host, boot, age=10**6)  # live, and old: kept
        _hold_row(conn, key_id, os.getppid(), billing._start_time(os.getppid()), host, boot)  # live: kept
        _hold_row(conn, key_id, dead, None, "another-host", boot)              # another host: never by pid
        _hold_row(conn, key_id, os.getpid(), started + 1, host, boot)        # pid reused: released
        _hold_row(conn, key_id, dead, 5, host, boot)                         # gone: released
        _hold_row(conn, key_id, os.getpid(), started, host, "an-older-boot")  # rebooted since: released
        _hold_row(conn, key_id, dead, None, None, None)                      # legacy row, dead pid: released
    assert billing.release_orphans(path) == 4
    with db.cli_connection(path) as conn:
        left = conn.execute("SELECT pid, host FROM holds ORDER BY id").fetchall()
        assert [tuple(r) for r in left] == [(os.getpid(), host), (os.getppid(), host), (dead, "another-host")]
        assert conn.execute("SELECT balance FROM api_keys").fetchone()[0] == 1000 - 30
        assert billing.audit(conn) == []
        stale = billing.stale_holds(conn, 3600)
        assert [s[3] for s in stale] == [os.getpid()] and stale[0][5] >= 10**6


def test_an_old_database_is_migrated(tmp_path):
    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE api_keys (id INTEGER PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL, balance INTEGER NOT NULL, rpm INTEGER, rpd INTEGER, created_at REAL NOT NULL,
            revoked_at REAL);
        CREATE TABLE holds (id INTEGER PRIMARY KEY, key_id INTEGER NOT NULL, request_id TEXT NOT NULL,
            pid INTEGER NOT NULL, amount INTEGER NOT NULL, created_at REAL NOT NULL);
        INSERT INTO api_keys VALUES (1, 'x', 'h', 'sk-', 90, NULL, NULL, 0, NULL);
        INSERT INTO holds VALUES (1, 1, 'r', 4242424, 10, 0);
        PRAGMA user_version = 1;""")
    old.close()
    db.init(path)
    db.init(path)  # idempotent
    with db.cli_connection(path) as conn:
        cols = {r[1] for r in conn.execute("PRAGMA table_info(holds)")}
        assert {"pid_started", "host", "boot_id"} <= cols
        assert conn.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
        assert conn.execute("SELECT pid, host FROM holds").fetchone()[:] == (4242424, None)


def test_hold_ttl_may_not_be_shorter_than_an_upstream_timeout():
    raw = {"server": {"hold_ttl_seconds": 60},
           "upstreams": {"u": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "timeout_seconds": 300}}}
    with pytest.raises(config.ConfigError, match="hold_ttl_seconds"):
        config.parse(raw)
    raw["server"]["hold_ttl_seconds"] = 300
    assert config.parse(raw).server.hold_ttl_seconds == 300
