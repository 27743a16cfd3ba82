"""What a key holder can ask with the key itself: GET /v1/key, and the two billing endpoints chat front-ends
call to show a balance. Each is served with and without the /v1 prefix (NextChat calls
`{base}/dashboard/billing/...` with the base URL the user typed, which often lacks /v1)."""
from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, current_app, g, request

import billing
import db
import keys
import policies
from errors import BadRequestError

_NUM = "\x00num{}\x00"


def exact_json(doc: Any) -> str:
    """JSON with Money values written as plain decimal numbers: exact, never through a float."""
    numbers: list[str] = []

    def walk(value: Any) -> Any:
        if isinstance(value, Money):
            numbers.append(value.text)
            return _NUM.format(len(numbers) - 1)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value
    text = json.dumps(walk(doc))
    for i, number in enumerate(numbers):
        text = text.replace(json.dumps(_NUM.format(i)), number, 1)
    return text


class Money:
    """nano-credits to be written as a decimal number of credits (scale=100 writes hundredths: cents)."""

    def __init__(self, nano: int, scale: int = 1) -> None:
        self.text = billing.format_credits(nano * scale)


def _respond(doc: Any) -> Response:
    return Response(exact_json(doc), mimetype="application/json", headers={"Cache-Control": "no-store"})


def _row() -> Any:
    conn = db.conn_for(current_app.config["GATEWAY"].server.database)
    return keys.get(conn, g.api_key.id)


def _rate_limits() -> dict:
    """The key's limits and what is left of each, from the limiter's check of this very request."""
    cfg = current_app.config["GATEWAY"]
    key = g.api_key
    out: dict[str, Any] = {"requests_per_minute": cfg.limits.default_rpm if key.rpm is None else key.rpm,
                           "requests_per_day": cfg.limits.default_rpd if key.rpd is None else key.rpd,
                           "remaining_minute": None, "remaining_day": None}
    for window in g.get("rate_windows") or ():  # ratelimit.py counted this very request in each window
        out["remaining_minute" if window.seconds <= 60 else "remaining_day"] = window.remaining
    return out


def key_info() -> Response:
    """Shaped after OpenRouter's GET /api/v1/key ({"data": {label, limit, usage, limit_remaining, rate_limit}}),
    with this gateway's balance, holds, caps and policies added. Amounts are credits as exact decimals."""
    row = _row()
    allowed = policies.load_allowed(row["allowed_models"])
    return _respond({"data": {
        "label": row["name"], "name": row["name"], "prefix": row["prefix"] + "...",
        "balance": Money(row["balance"]), "balance_nano": row["balance"],
        "held": Money(row["held"]), "requests_in_flight": row["in_flight"],
        "usage": Money(row["spent_month"]), "usage_daily": Money(row["spent_today"]),
        "usage_monthly": Money(row["spent_month"]),
        "limit": Money(row["monthly_cap"]) if row["monthly_cap"] is not None else None,
        "limit_remaining": Money(row["balance"]),
        "daily_cap": Money(row["daily_cap"]) if row["daily_cap"] is not None else None,
        "monthly_cap": Money(row["monthly_cap"]) if row["monthly_cap"] is not None else None,
        "rate_limit": _rate_limits(),
        "expires_at": policies.when(row["expires_at"]) if row["expires_at"] is not None else None,
        "allowed_models": list(allowed) if allowed is not None else None,
        "is_free_tier": False,
    }})


def subscription() -> Response:
    """OpenAI's old billing_subscription. NextChat (app/client/platforms/openai.ts, usage()) reads only
    `hard_limit_usd` (a number, shown as the total) and shows `total_usage / 100` from the usage call as what
    was used. So hard_limit_usd is what the key could spend this month: balance + held + spent since the 1st
    (UTC), so that total - used is what is left; lowered to the monthly cap when one is set."""
    row = _row()
    total = row["balance"] + row["held"] + row["spent_month"]
    if row["monthly_cap"] is not None:
        total = min(total, row["monthly_cap"])
    expires = row["expires_at"]
    return _respond({"object": "billing_subscription", "has_payment_method": True,
                     "soft_limit_usd": Money(total), "hard_limit_usd": Money(total),
                     "system_hard_limit_usd": Money(total),
                     "access_until": int(expires) if expires is not None else 0})


def _date(name: str) -> float | None:
    value = request.args.get(name)
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise BadRequestError(f"'{name}' must be a date as YYYY-MM-DD.", param=name, code="invalid_value") from None


def usage() -> Response:
    """OpenAI's old dashboard usage: NextChat sends start_date (the 1st of this month) and end_date (tomorrow),
    both YYYY-MM-DD, end exclusive, and divides `total_usage` by 100: it is in hundredths of a credit (cents)."""
    start = _date("start_date")
    end = _date("end_date")
    start = policies.month_start() if start is None else start
    conn = db.conn_for(current_app.config["GATEWAY"].server.database)
    args: tuple = (g.api_key.id, start) if end is None else (g.api_key.id, start, end)
    sql = ("SELECT COALESCE(SUM(cost - uncollected), 0) FROM usage WHERE key_id = ? AND created_at >= ?"
           + ("" if end is None else " AND created_at < ?"))
    spent = int(conn.execute(sql, args).fetchone()[0])
    return _respond({"object": "list", "total_usage": Money(spent, 100)})


def register(app: Flask) -> None:
    for prefix in ("/v1", ""):
        app.add_url_rule(f"{prefix}/key", f"selfservice_key{prefix}", key_info, methods=["GET"])
        app.add_url_rule(f"{prefix}/dashboard/billing/subscription", f"selfservice_subscription{prefix}",
                         subscription, methods=["GET"])
        app.add_url_rule(f"{prefix}/dashboard/billing/usage", f"selfservice_usage{prefix}", usage, methods=["GET"])
