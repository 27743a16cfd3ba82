"""Admin queries on a generated million-row usage table, the insert cost of each usage index, and the cost of the
metrics hooks per request.

    .venv/bin/python bench/admin_queries.py [--rows 1000000] [--keys 1000]

Builds the database in a temporary directory (schema.sql, then ROWS usage rows spread over the last 90 days
across KEYS keys), times each admin query as the admin API runs it (median of several runs, warm cache), then
times single-row usage inserts in their own transaction (as a settlement writes them) with no usage index,
with usage_key_time, and with both.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="bench-metrics-"))

import billing  # noqa: E402
import db  # noqa: E402
import keys  # noqa: E402
import policies  # noqa: E402
import retention  # noqa: E402

MODELS = ("gpt-4.1-mini", "gpt-4.1", "gemini-2.5-flash", "gpt-image-1")
ROUTES = ("chat.completions", "chat.completions", "completions", "images.generations")


def build(path: str, rows: int, nkeys: int) -> None:
    db.init(path)
    conn = db.connect(path, busy_seconds=30)
    conn.execute("DROP INDEX IF EXISTS usage_key_time")
    conn.execute("DROP INDEX IF EXISTS usage_time")
    conn.execute("BEGIN")
    now = time.time()
    conn.executemany("INSERT INTO api_keys(name, key_hash, prefix, balance, created_at) VALUES (?, ?, ?, ?, ?)",
                     [(f"k{i}", f"h{i}", "sk-bench", 10**12, now) for i in range(nkeys)])
    rng = random.Random(1)
    start = now - 90 * 86400
    step = 90 * 86400 / rows

    def gen():
        for i in range(rows):
            m = rng.randrange(4)
            yield (f"req_{i:024x}", rng.randint(1, nkeys), ROUTES[m], MODELS[m], rng.randint(10, 4000),
                   rng.randint(0, 800), rng.randint(1000, 900000), 200 if rng.random() < 0.97 else 502,
                   rng.randint(50, 9000), start + i * step)
    conn.executemany("INSERT INTO usage(request_id, key_id, route, model, prompt_tokens, completion_tokens, cost,"
                     " status, latency_ms, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", gen())
    conn.execute("COMMIT")
    conn.close()


def timed(fn, runs: int = 7) -> float:
    """Median milliseconds of fn() over runs (after one warm-up); a call over a second is timed once only."""
    t = time.perf_counter()
    fn()
    first = (time.perf_counter() - t) * 1000
    if first > 1000:
        return first
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def queries(conn: sqlite3.Connection, nkeys: int) -> list[tuple[str, float]]:
    """The admin API's queries, as admin.py / keys.py / billing.py / policies.py run them."""
    key = nkeys // 2
    page = ("SELECT * FROM usage {w} ORDER BY created_at DESC, id DESC LIMIT 101")
    deep = conn.execute("SELECT created_at, id FROM usage WHERE key_id = ? ORDER BY created_at DESC, id DESC"
                        " LIMIT 1 OFFSET 500", (key,)).fetchone() or conn.execute(  # a key with fewer rows: its oldest
        "SELECT created_at, id FROM usage WHERE key_id = ? ORDER BY created_at, id LIMIT 1", (key,)).fetchone()
    week = time.time() - 7 * 86400
    return [
        ("keys list with balances, holds, spend today/month (all keys)", _list_keys(conn)),
        ("one key (keys.get)", timed(lambda: keys.get(conn, key))),
        ("usage page, one key, newest 100", timed(lambda: conn.execute(page.format(w="WHERE key_id = ?"),
                                                                       (key,)).fetchall())),
        ("usage page, one key, after a cursor 500 rows back",
         timed(lambda: conn.execute(page.format(w="WHERE key_id = ? AND (created_at, id) < (?, ?)"),
                                    (key, deep[0], deep[1])).fetchall())),
        ("usage page, all keys, newest 100", timed(lambda: conn.execute(page.format(w="")).fetchall())),
        ("usage page, all keys, one model", timed(lambda: conn.execute(page.format(w="WHERE model = ?"),
                                                                       ("gpt-4.1",)).fetchall())),
        ("usage page, all keys, status 502", timed(lambda: conn.execute(page.format(w="WHERE status = ?"),
                                                                        (502,)).fetchall())),
        ("usage page, one key, last 7 days, one model",
         timed(lambda: conn.execute(page.format(w="WHERE key_id = ? AND created_at >= ? AND model = ?"),
                                    (key, week, "gpt-4.1")).fetchall())),
        ("spend per day, 30 days, all keys (page chart)", timed(lambda: billing.spend_by_day(conn, 30), 3)),
        ("spend per day, 30 days, one key", timed(lambda: billing.spend_by_day(conn, 30, key))),
        ("cap check: spend today + this month, one key (hot path)",
         timed(lambda: (policies.spent_since(conn, key, policies.day_start()),
                        policies.spent_since(conn, key, policies.month_start())))),
        ("self-service usage (dashboard/billing/usage), one key", timed(lambda: conn.execute(
            "SELECT COALESCE(SUM(cost - uncollected), 0) FROM usage WHERE key_id = ? AND created_at >= ?",
            (key, policies.month_start())).fetchone())),
        ("audit (ledger sums, no usage)", timed(lambda: billing.audit(conn), 3)),
        ("retention: one batch of 500 rows older than 60 days (rolled back)", timed(lambda: _retention_batch(conn))),
    ]


def _list_keys(conn: sqlite3.Connection) -> float:
    """keys.list_with_balances; without usage_key_time it scans the table twice per key, so there it is timed on
    the first 20 keys and scaled to all of them (marked in the output by a value over a second)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'usage_key_time'").fetchone():
        return timed(lambda: keys.list_with_balances(conn))
    total = conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0]
    sql = keys._DETAIL + " WHERE k.id <= 20"
    t = time.perf_counter()
    conn.execute(sql, (policies.day_start(), policies.month_start())).fetchall()
    return (time.perf_counter() - t) * 1000 * total / 20


def _retention_batch(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("DELETE FROM usage WHERE id IN (SELECT id FROM usage WHERE created_at < ? LIMIT ?)",
                 (retention.cutoff(60), retention.BATCH))
    conn.execute("ROLLBACK")


def insert_cost(path: str, n: int, nkeys: int) -> float:
    """Microseconds per settlement-like usage insert, each in its own BEGIN IMMEDIATE ... COMMIT."""
    conn = db.connect(path, busy_seconds=30)
    conn.execute("PRAGMA wal_autocheckpoint=0")  # as in the workers (a thread checkpoints)
    rng = random.Random(2)
    now = time.time()
    t = time.perf_counter()
    for i in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO usage(request_id, key_id, route, model, cost, status, latency_ms, created_at)"
                     " VALUES (?, ?, 'chat.completions', 'gpt-4.1-mini', 100, 200, 5, ?)",
                     (f"new{i}", rng.randint(1, nkeys), now + i * 0.001))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return elapsed / n * 1e6


def metrics_cost(n: int) -> float:
    """Microseconds the metrics hooks add to one settled request (multiprocess mode, files on disk)."""
    import metrics
    t = time.perf_counter()
    for _ in range(n):
        metrics.HOLDS.inc()
        metrics.HOLDS.dec()
        metrics.record_settlement("chat.completions", "gpt-4.1-mini", 0.12, 120, 40, 56000)
        metrics.record_request("chat.completions", "gpt-4.1-mini", 200)
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--inserts", type=int, default=3000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="admin-bench-"))
    try:
        bare = str(tmp / "bare.db")
        t = time.perf_counter()
        build(bare, args.rows, args.keys)
        print(f"built {args.rows} usage rows over {args.keys} keys in {time.perf_counter() - t:.1f} s")
        one, both = str(tmp / "one.db"), str(tmp / "both.db")
        shutil.copy(bare, one)
        conn = db.connect(one)
        conn.execute("CREATE INDEX usage_key_time ON usage(key_id, created_at)")
        conn.close()
        shutil.copy(one, both)
        conn = db.connect(both)
        conn.execute("CREATE INDEX usage_time ON usage(created_at)")
        conn.close()

        print("\nquery (median ms)                                              no index   both indexes")
        c_bare, c_both = db.connect(bare), db.connect(both)
        for (name, ms_bare), (_, ms_both) in zip(queries(c_bare, args.keys), queries(c_both, args.keys), strict=True):
            print(f"  {name:<60} {ms_bare:>9.2f} {ms_both:>12.2f}")
        c_bare.close()
        c_both.close()

        print(f"\nsettlement-like usage insert, own transaction (µs/insert, {args.rows:,} rows present)")
        for name, path in (("no usage index", bare), ("usage_key_time", one), ("usage_key_time + usage_time", both)):
            print(f"  {name:<40} {insert_cost(path, args.inserts, args.keys):>8.1f}")
        print(f"\nmetrics hooks per settled request: {metrics_cost(20000):.1f} µs "
              f"(PROMETHEUS_MULTIPROC_DIR={os.environ['PROMETHEUS_MULTIPROC_DIR']})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


if __name__ == "__main__":
    main()
