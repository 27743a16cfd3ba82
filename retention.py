"""Background deletion of usage rows older than [server] usage_retention_days (0 keeps them forever).

Each worker runs one greenlet: FIRST_DELAY_SECONDS after it starts, then every INTERVAL_SECONDS, it deletes
old rows BATCH rows per transaction through db.write (the same short, cooperative write every request uses),
sleeping between batches, so requests never wait for more than one small batch. Rows of the current UTC month
are never deleted, whatever the setting: the monthly spending caps are summed from them. The ledger is kept
whole, so `flask audit` is unaffected. Several workers doing this at once only share the work.
"""
from __future__ import annotations

import logging
import sqlite3
import time

import gevent

import db
import policies

BATCH = 500
PAUSE_SECONDS = 0.05
FIRST_DELAY_SECONDS = 1.0
INTERVAL_SECONDS = 600.0

log = logging.getLogger("gateway")


def cutoff(days: int, now: float | None = None) -> float:
    now = time.time() if now is None else now
    return min(now - days * 86400, policies.month_start(now))


def delete_old(path: str, days: int, batch: int = BATCH, pause: float = PAUSE_SECONDS) -> int:
    """Delete usage rows older than the cutoff in batches; returns how many. Uses the usage_time index."""
    before = cutoff(days)
    total = 0
    while True:
        def work(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM usage WHERE id IN (SELECT id FROM usage WHERE created_at < ? LIMIT ?)",
                                (before, batch)).rowcount
        deleted = db.write(path, work)
        total += deleted
        if deleted < batch:
            return total
        gevent.sleep(pause)


def _loop(path: str, days: int) -> None:
    gevent.sleep(FIRST_DELAY_SECONDS)
    while True:
        try:
            deleted = delete_old(path, days)
            if deleted:
                log.info("retention: deleted %d usage rows older than %d days", deleted, days)
        except sqlite3.Error as exc:
            log.warning("retention: deletion failed (%s); trying again in %g s", exc, INTERVAL_SECONDS)
        gevent.sleep(INTERVAL_SECONDS)


def start(path: str, days: int) -> gevent.Greenlet | None:
    """Start the worker's retention greenlet; None when retention is off (days = 0)."""
    if days <= 0:
        return None
    return gevent.spawn(_loop, path, days)
