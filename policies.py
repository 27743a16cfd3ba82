"""Per-key policies: allowed models, expiry, daily and monthly spending caps.

Pure checks on an ApiKey plus the two SQL sums the caps need. Days and months are UTC: a daily cap resets at
00:00 UTC, a monthly one at 00:00 UTC on the 1st; nothing has to run for it to reset, since spend is summed
from the usage rows since that instant.
"""
from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import billing
from errors import AuthenticationError, InsufficientCreditsError, PermissionDeniedError

MAX_ALLOWED_MODELS = 1000


def when(ts: float) -> str:
    """A moment as an ISO 8601 UTC time to the second: 2026-12-01T00:00:00Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def day_start(now: float | None = None) -> float:
    d = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return d.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def month_start(now: float | None = None) -> float:
    d = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return d.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def parse_allowed_models(value: Any) -> list[str] | None:
    """None (all models) or a list of distinct non-empty model ids; a comma-separated string is accepted for the
    CLI and the page. Raises ValueError with the reason."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
        if not value:
            return None
    if not isinstance(value, list) or not all(isinstance(m, str) and m.strip() for m in value):
        raise ValueError("allowed_models must be null (every model) or a list of model ids")
    if len(value) > MAX_ALLOWED_MODELS:
        raise ValueError(f"allowed_models lists at most {MAX_ALLOWED_MODELS} models")
    return list(dict.fromkeys(m.strip() for m in value))


def load_allowed(text: str | None) -> tuple[str, ...] | None:
    """The stored JSON column as a tuple, or None for every model."""
    if text is None:
        return None
    return tuple(json.loads(text))


def parse_expiry(value: Any) -> float | None:
    """An expiry as unix seconds (a number) or an ISO 8601 date/time (UTC when it names no zone); None for none."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("expires_at must be a unix time or an ISO 8601 date such as 2027-01-31T00:00:00Z")
    if isinstance(value, (int, float)):
        if not 0 <= value < 2**40:
            raise ValueError(f"expires_at {value} is not a plausible unix time")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text) if text.replace(".", "", 1).isdigit() else _iso(text)
        except ValueError:
            pass
    raise ValueError(f"expires_at {value!r} must be a unix time or an ISO 8601 date such as 2027-01-31T00:00:00Z")


def _iso(text: str) -> float:
    d = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return d.timestamp()


def parse_cap(value: Any, name: str) -> int | None:
    """A cap in credits (decimal string or number) to nano-credits; None for no cap."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number of credits or null")
    try:
        return billing.parse_credits(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def check_expiry(key: Any, now: float | None = None) -> None:
    """401 for a key past its expiry, saying when it expired."""
    expires = getattr(key, "expires_at", None)
    if expires is not None and (time.time() if now is None else now) >= expires:
        raise AuthenticationError(f"This API key expired at {when(expires)}; ask the operator for a new key or a later "
                        "expiry.", code="key_expired")


def may_use(key: Any, model_id: str) -> bool:
    allowed = getattr(key, "allowed_models", None)
    return allowed is None or model_id in allowed


def check_model(key: Any, model_id: str) -> None:
    """403 for a model the key may not call."""
    if model_id and not may_use(key, model_id):
        shown = ", ".join(key.allowed_models) or "none"
        raise PermissionDeniedError(f"This API key may not use the model `{model_id}`; it may use: {shown}.",
                               param="model", code="model_not_allowed")


def visible(key: Any, models: Iterable[Any]) -> list[Any]:
    """The models a key may call, for GET /v1/models."""
    return [m for m in models if key is None or may_use(key, m.id)]


def spent_since(conn: sqlite3.Connection, key_id: int, since: float) -> int:
    """Nano-credits a key was really charged (cost less uncollected) since a moment; uses usage_key_time."""
    row = conn.execute("SELECT COALESCE(SUM(cost - uncollected), 0) FROM usage WHERE key_id = ? AND created_at >= ?",
                       (key_id, since)).fetchone()
    return int(row[0])


def held(conn: sqlite3.Connection, key_id: int) -> int:
    return int(conn.execute("SELECT COALESCE(SUM(amount), 0) FROM holds WHERE key_id = ?", (key_id,)).fetchone()[0])


def cap_room(key: Any) -> Callable[[sqlite3.Connection], tuple[int, InsufficientCreditsError] | None] | None:
    """For billing.hold, run inside its transaction: how many nano-credits the key may still hold under its
    tightest spending cap (spend today or this month plus its open holds, against the cap), and the 402 naming
    that cap and when it resets. The hold plans within min(balance, room), so an uncapped chat request still
    fits under a small cap. None when the key has no cap."""
    daily, monthly = getattr(key, "daily_cap", None), getattr(key, "monthly_cap", None)
    if daily is None and monthly is None:
        return None

    def room(conn: sqlite3.Connection) -> tuple[int, InsufficientCreditsError] | None:
        now = time.time()
        in_flight = held(conn, key.id)  # the new hold is not written yet
        tightest: tuple[int, InsufficientCreditsError] | None = None
        for cap, start, per, resets in ((daily, day_start(now), "daily", day_start(now) + 86400),
                                        (monthly, month_start(now), "monthly", _next_month(now))):
            if cap is None:
                continue
            spent = spent_since(conn, key.id, start)
            left = max(0, cap - spent - in_flight)
            if tightest is None or left < tightest[0]:
                tightest = (left, InsufficientCreditsError(
                    f"This key reached its {per} spending cap of {billing.format_credits(cap)} credits: "
                    f"{billing.format_credits(spent)} spent and {billing.format_credits(in_flight)} held by "
                    f"requests in flight leave {billing.format_credits(left)}, too little for this request. "
                    f"The cap resets at {when(resets)}.", code=f"{per}_cap_reached"))
        return tightest
    return room


def _next_month(now: float) -> float:
    d = datetime.fromtimestamp(month_start(now), UTC)
    return d.replace(year=d.year + (d.month == 12), month=d.month % 12 + 1).timestamp()
