"""The admin API under /admin/api/: keys, top-ups and corrections, usage (JSON or CSV), audit, OpenAPI document.

Authenticated by `Authorization: Bearer $GATEWAY_ADMIN_TOKEN`, compared in constant time. With no token set,
every /admin and /metrics URL answers 404 as if it did not exist. Wrong tokens are counted per client address
in each worker's memory (THROTTLE_FAILURES per THROTTLE_SECONDS, then 429 until the window passes), so with N
workers an address gets at most N times that many guesses. The token is never logged.

Every database call runs in a thread of this module's own pool on a connection of its own that may wait for
locks: the worker's event loop never blocks on an admin query (a usage listing over millions of rows, or a
write waiting for another process), and the functions called are the ones the CLI calls.
"""
from __future__ import annotations

import csv
import hmac
import io
import json
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Flask, Request, Response, current_app, request
from gevent.threadpool import ThreadPool

import billing
import db
import keys
import policies
from errors import AuthenticationError, BadRequestError, GatewayError, NotFoundError, RateLimitError

T = TypeVar("T")
TOKEN_ENV = "GATEWAY_ADMIN_TOKEN"
THROTTLE_FAILURES = 10
THROTTLE_SECONDS = 60.0
MAX_PAGE = 1000
_failures: dict[str, deque[float]] = {}
_pool: list[tuple[int, ThreadPool]] = []

bp = Blueprint("admin_api", __name__, url_prefix="/admin/api")


def admin_token() -> str:
    return os.environ.get(TOKEN_ENV, "")


def not_found() -> NotFoundError:
    return NotFoundError(f"Unknown request URL: {request.method} {request.path}.")


def throttled(addr: str) -> int:
    """Seconds until this address may try a token again (0: now), forgetting failures older than the window."""
    now = time.monotonic()
    seen = _failures.get(addr)
    if not seen:
        return 0
    while seen and seen[0] <= now - THROTTLE_SECONDS:
        seen.popleft()
    if not seen:
        _failures.pop(addr, None)
        return 0
    return max(1, int(seen[0] + THROTTLE_SECONDS - now) + 1) if len(seen) >= THROTTLE_FAILURES else 0


def check_token(given: str, addr: str) -> bool:
    """Whether given is the admin token; a wrong one counts against addr. Raises 429 while addr is throttled."""
    wait = throttled(addr)
    if wait:
        raise RateLimitError(f"Too many wrong admin tokens from this address; try again in {wait}s.",
                          headers={"Retry-After": str(wait)}, code="admin_throttled")
    expected = admin_token()
    if hmac.compare_digest(given.encode(), expected.encode()):
        return True
    if len(_failures) > 100_000:  # a flood of addresses cannot grow this without bound
        _failures.clear()
    _failures.setdefault(addr, deque()).append(time.monotonic())
    return False


def require_token(req: Request) -> None:
    """404 when no admin token is configured; 401 (counted) for a missing or wrong Bearer token."""
    if not admin_token():
        raise not_found()
    scheme, _, given = req.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not check_token(given.strip(), req.remote_addr or "-"):
        raise AuthenticationError("This needs the admin token: send 'Authorization: Bearer <GATEWAY_ADMIN_TOKEN>'.",
                        code="invalid_admin_token")


def run(work: Callable[[sqlite3.Connection], T]) -> T:
    """work(conn) in the admin thread on a connection that waits for locks, off the event loop."""
    path = current_app.config["GATEWAY"].server.database

    def call() -> T:
        conn = db.connect(path, busy_seconds=db.LOCK_WAIT_SECONDS)
        try:
            return work(conn)
        finally:
            conn.close()
    pid = db.pid()
    if not _pool or _pool[0][0] != pid:
        _pool[:] = [(pid, ThreadPool(1))]
    return _pool[0][1].apply(call)


# -- shapes -------------------------------------------------------------------------------------------------

def credits(nano: int | None) -> str | None:
    """Credits as a plain decimal string (exact; JSON numbers would be floats in most clients)."""
    return None if nano is None else billing.format_credits(nano)


def key_state(row: sqlite3.Row, now: float | None = None) -> str:
    if row["revoked_at"] is not None:
        return "revoked"
    if row["expires_at"] is not None and (time.time() if now is None else now) >= row["expires_at"]:
        return "expired"
    return "active"


def key_doc(row: sqlite3.Row) -> dict:
    cfg = current_app.config["GATEWAY"]
    allowed = policies.load_allowed(row["allowed_models"])
    return {
        "id": row["id"], "object": "api_key", "name": row["name"], "prefix": row["prefix"] + "...",
        "state": key_state(row),
        "balance": credits(row["balance"]), "balance_nano": row["balance"],
        "held": credits(row["held"]), "held_nano": row["held"], "requests_in_flight": row["in_flight"],
        "spent_today": credits(row["spent_today"]), "spent_this_month": credits(row["spent_month"]),
        "rpm": row["rpm"], "rpd": row["rpd"],
        "effective_rpm": cfg.limits.default_rpm if row["rpm"] is None else row["rpm"],
        "effective_rpd": cfg.limits.default_rpd if row["rpd"] is None else row["rpd"],
        "allowed_models": list(allowed) if allowed is not None else None,
        "expires_at": policies.when(row["expires_at"]) if row["expires_at"] is not None else None,
        "daily_cap": credits(row["daily_cap"]), "monthly_cap": credits(row["monthly_cap"]),
        "created_at": policies.when(row["created_at"]),
        "revoked_at": policies.when(row["revoked_at"]) if row["revoked_at"] is not None else None,
    }


USAGE_COLUMNS = ("id", "created_at", "request_id", "parent_request_id", "key_id", "route", "model", "status",
                 "prompt_tokens", "completion_tokens", "units", "estimated", "cost", "uncollected", "latency_ms")


def usage_doc(row: sqlite3.Row) -> dict:
    doc = {c: row[c] for c in USAGE_COLUMNS}
    doc["created_at"] = policies.when(row["created_at"])
    doc["created"] = row["created_at"]
    doc["estimated"] = bool(row["estimated"])
    doc["cost"], doc["cost_nano"] = credits(row["cost"]), row["cost"]
    doc["uncollected"] = credits(row["uncollected"])
    return doc


# -- parsing ------------------------------------------------------------------------------------------------

def body_object() -> dict:
    try:
        body = json.loads(request.get_data(cache=False) or b"{}")
    except (ValueError, RecursionError):
        raise BadRequestError("The body must be a JSON object.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequestError("The body must be a JSON object.", code="invalid_json")
    return body


def parse_changes(body: dict, allowed: tuple[str, ...]) -> dict[str, Any]:
    """Key fields from a JSON body (or a form turned into a dict), parsed; 400 naming the field otherwise."""
    changes: dict[str, Any] = {}
    for name, value in body.items():
        if name not in allowed:
            raise BadRequestError(f"Unknown field '{name}'; known: {', '.join(allowed)}.", param=name,
                                 code="unknown_field")
        try:
            if name in ("daily_cap", "monthly_cap"):
                changes[name] = policies.parse_cap(value, name)
            elif name == "allowed_models":
                changes[name] = policies.parse_allowed_models(value)
            elif name == "expires_at":
                changes[name] = policies.parse_expiry(value)
            elif name in ("rpm", "rpd"):
                changes[name] = _limit(value, name)
            else:
                changes[name] = value
        except ValueError as exc:
            raise BadRequestError(f"'{name}': {exc}.", param=name, code="invalid_value") from None
    return changes


def _limit(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= keys.MAX_LIMIT:
        raise ValueError(f"must be a whole number from 0 (unlimited) to {keys.MAX_LIMIT}, or null for the default")
    return value


def parse_amount(value: Any, param: str = "credits") -> int:
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRequestError(f"'{param}' must be a number of credits such as 5 or \"0.5\".", param=param,
                             code="invalid_value")
    try:
        return billing.parse_credits(value)
    except ValueError as exc:
        raise BadRequestError(f"'{param}': {exc}.", param=param, code="invalid_value") from None


# -- operations shared with the page ------------------------------------------------------------------------

CREATE_FIELDS = ("name", "credits", *keys.UPDATABLE[1:])


def create_key(body: dict) -> tuple[dict, str]:
    """Create a key from API/page fields; returns (its document, the secret shown once)."""
    body = dict(body)
    name = body.pop("name", None)
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise BadRequestError("'name' must be a non-empty string of at most 200 characters.", param="name",
                             code="invalid_value")
    nano = parse_amount(body.pop("credits", None))
    changes = parse_changes(body, keys.UPDATABLE[1:])
    rpm, rpd = changes.pop("rpm", None), changes.pop("rpd", None)

    def work(conn: sqlite3.Connection) -> tuple[sqlite3.Row, str]:
        key_id, secret = keys.create(conn, name.strip(), nano, rpm, rpd, **changes)
        return keys.get(conn, key_id), secret
    try:
        row, secret = run(work)
    except ValueError as exc:
        raise BadRequestError(f"No key was created: {exc}.", code="invalid_value") from None
    return key_doc(row), secret


def update_key(key_id: int, body: dict) -> dict:
    changes = parse_changes(body, keys.UPDATABLE)
    return _changed(key_id, "changed", lambda conn: keys.update(conn, key_id, changes))


def _changed(key_id: int, verb: str, work: Callable[[sqlite3.Connection], sqlite3.Row]) -> dict:
    """The key's document after work (which returns its row), or 404 for no such key and 400 naming what was
    wrong with the change: the one mapping update, top-up and correction share."""
    try:
        return key_doc(run(work))
    except LookupError:
        raise NotFoundError(f"There is no key with id {key_id}.", code="key_not_found") from None
    except ValueError as exc:
        raise BadRequestError(f"Key {key_id} was not {verb}: {exc}.", code="invalid_value") from None


def topup_key(key_id: int, amount: int) -> dict:
    def work(conn: sqlite3.Connection) -> sqlite3.Row:
        keys.topup(conn, key_id, amount)
        return keys.get(conn, key_id)
    return _changed(key_id, "topped up", work)


def correct_key(key_id: int, amount: int, reason: Any) -> dict:
    if not isinstance(reason, str) or not reason.strip():
        raise BadRequestError("A correction needs a 'reason' (a sentence for the ledger).", param="reason",
                             code="missing_required_parameter")

    def work(conn: sqlite3.Connection) -> sqlite3.Row:
        billing.correct(conn, key_id, amount, reason)
        return keys.get(conn, key_id)
    return _changed(key_id, "corrected", work)


def revoke_key(key_id: int) -> dict:
    def work(conn: sqlite3.Connection) -> tuple[bool, sqlite3.Row]:
        row = keys.get(conn, key_id)
        changed = keys.revoke(conn, key_id)
        return changed, keys.get(conn, key_id) if changed else row
    try:
        _, row = run(work)
    except LookupError:
        raise NotFoundError(f"There is no key with id {key_id}.", code="key_not_found") from None
    return key_doc(row)


def list_keys() -> list[dict]:
    return [key_doc(r) for r in run(keys.list_with_balances)]


def get_key(key_id: int) -> dict:
    try:
        return key_doc(run(lambda conn: keys.get(conn, key_id)))
    except LookupError:
        raise NotFoundError(f"There is no key with id {key_id}.", code="key_not_found") from None


def audit_doc() -> dict:
    cfg = current_app.config["GATEWAY"]

    def work(conn: sqlite3.Connection) -> tuple[list, int, list]:
        bad = billing.audit(conn)
        count = conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0]
        return bad, count, billing.stale_holds(conn, cfg.server.hold_ttl_seconds)
    bad, count, stale = run(work)
    return {"ok": not bad, "keys": count,
            "mismatches": [{"key_id": k, "balance": credits(b), "held": credits(h), "ledger": credits(lg)}
                           for k, b, h, lg in bad],
            "stale_holds": [{"id": s[0], "key_id": s[1], "request_id": s[2], "pid": s[3], "host": s[4],
                             "age_seconds": int(s[5])} for s in stale]}


def _time_arg(args: dict, name: str) -> float | None:
    value = args.get(name)
    if value in (None, ""):
        return None
    try:
        return policies.parse_expiry(value)
    except ValueError:
        raise BadRequestError(f"'{name}' must be a unix time or an ISO 8601 date such as 2026-11-30T00:00:00Z.",
                             param=name, code="invalid_value") from None


def _int_arg(args: dict, name: str, low: int, high: int, default: int | None = None) -> int | None:
    value = args.get(name)
    if value in (None, ""):
        return default
    if not str(value).strip().isdigit() or not low <= int(value) <= high:
        raise BadRequestError(f"'{name}' must be a whole number from {low} to {high}.", param=name,
                             code="invalid_value")
    return int(value)


def query_usage(args: dict) -> dict:
    """Usage rows newest first with filters key_id, model, route, status, since, until; `limit` rows a page and
    `after` (the previous page's next_cursor) for the next. Ordered by (created_at, id), which the indexes
    usage_key_time and usage_time hold in order, so a page reads about `limit` rows at any table size."""
    where, params = [], []
    key_id = _int_arg(args, "key_id", 1, 2**63 - 1)
    if key_id is not None:
        where.append("key_id = ?")
        params.append(key_id)
    for name in ("model", "route"):
        if args.get(name):
            where.append(f"{name} = ?")
            params.append(str(args[name])[:200])
    status = _int_arg(args, "status", 100, 599)
    if status is not None:
        where.append("status = ?")
        params.append(status)
    since, until = _time_arg(args, "since"), _time_arg(args, "until")
    if since is not None:
        where.append("created_at >= ?")
        params.append(since)
    if until is not None:
        where.append("created_at < ?")
        params.append(until)
    cursor = args.get("after")
    if cursor:
        try:
            at, _, row_id = str(cursor).partition(":")
            where.append("(created_at, id) < (?, ?)")
            params += [float(at), int(row_id)]
        except ValueError:
            raise BadRequestError("'after' must be a next_cursor from a previous page.", param="after",
                                 code="invalid_value") from None
    limit = _int_arg(args, "limit", 1, MAX_PAGE, 100)
    sql = (f"SELECT * FROM usage {'WHERE ' + ' AND '.join(where) if where else ''}"
           " ORDER BY created_at DESC, id DESC LIMIT ?")
    rows = run(lambda conn: conn.execute(sql, (*params, limit + 1)).fetchall())
    more = len(rows) > limit
    rows = rows[:limit]
    return {"object": "list", "data": [usage_doc(r) for r in rows], "has_more": more,
            "next_cursor": f"{rows[-1]['created_at']!r}:{rows[-1]['id']}" if more else None}


def usage_csv(page: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    columns = [*USAGE_COLUMNS, "cost_nano"]
    writer.writerow(columns)
    for doc in page["data"]:
        writer.writerow(["" if doc[c] is None else doc[c] for c in columns])
    return out.getvalue()


def _json(doc: Any, status: int = 200) -> Response:
    return Response(json.dumps(doc), status=status, mimetype="application/json",
                    headers={"Cache-Control": "no-store"})


# -- routes -------------------------------------------------------------------------------------------------

@bp.before_request
def _auth() -> None:
    require_token(request)


@bp.get("/keys")
def api_list_keys() -> Response:
    return _json({"object": "list", "data": list_keys()})


@bp.post("/keys")
def api_create_key() -> Response:
    body = body_object()
    unknown = [k for k in body if k not in CREATE_FIELDS]
    if unknown:
        raise BadRequestError(f"Unknown field '{unknown[0]}'; known: {', '.join(CREATE_FIELDS)}.", param=unknown[0],
                             code="unknown_field")
    doc, secret = create_key(body)
    return _json({**doc, "key": secret}, 201)


@bp.get("/keys/<int:key_id>")
def api_get_key(key_id: int) -> Response:
    return _json(get_key(key_id))


@bp.patch("/keys/<int:key_id>")
def api_update_key(key_id: int) -> Response:
    return _json(update_key(key_id, body_object()))


@bp.post("/keys/<int:key_id>/topup")
def api_topup(key_id: int) -> Response:
    return _json(topup_key(key_id, parse_amount(body_object().get("credits"))))


@bp.post("/keys/<int:key_id>/correct")
def api_correct(key_id: int) -> Response:
    body = body_object()
    return _json(correct_key(key_id, parse_amount(body.get("credits")), body.get("reason")))


@bp.post("/keys/<int:key_id>/revoke")
def api_revoke(key_id: int) -> Response:
    return _json(revoke_key(key_id))


@bp.get("/usage")
def api_usage() -> Response:
    page = query_usage(request.args.to_dict())
    if request.args.get("format") == "csv":
        return Response(usage_csv(page), mimetype="text/csv",
                        headers={"Content-Disposition": "attachment; filename=usage.csv",
                                 "X-Next-Cursor": page["next_cursor"] or ""})
    return _json(page)


@bp.get("/audit")
def api_audit() -> Response:
    return _json(audit_doc())


@bp.get("/openapi.json")
def api_openapi() -> Response:
    return _json(openapi())


def openapi() -> dict:
    """The admin API as an OpenAPI 3.1 document."""
    error = {"$ref": "#/components/schemas/Error"}
    key = {"$ref": "#/components/schemas/Key"}
    money = {"type": ["string", "number", "null"], "description": "Credits as a decimal, at most 9 places."}
    fields = {"name": {"type": "string"}, "rpm": {"type": ["integer", "null"]}, "rpd": {"type": ["integer", "null"]},
              "allowed_models": {"type": ["array", "null"], "items": {"type": "string"}},
              "expires_at": {"type": ["string", "number", "null"], "description": "ISO 8601 or unix seconds"},
              "daily_cap": money, "monthly_cap": money}

    def op(summary: str, ok: dict, body: dict | None = None, params: list | None = None, status: str = "200") -> dict:
        doc: dict = {"summary": summary, "responses": {
            status: {"description": "OK", "content": {"application/json": {"schema": ok}}},
            "400": {"description": "Bad input", "content": {"application/json": {"schema": error}}},
            "401": {"description": "Wrong or missing admin token", "content": {"application/json": {"schema": error}}},
            "404": {"description": "No such key, or no admin token configured",
                    "content": {"application/json": {"schema": error}}},
            "429": {"description": "Too many wrong tokens from this address"}}}
        if body:
            doc["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        if params:
            doc["parameters"] = params
        return doc
    key_id = [{"name": "key_id", "in": "path", "required": True, "schema": {"type": "integer"}}]
    q = [{"name": n, "in": "query", "schema": {"type": t}} for n, t in (
        ("key_id", "integer"), ("model", "string"), ("route", "string"), ("status", "integer"),
        ("since", "string"), ("until", "string"), ("limit", "integer"), ("after", "string"), ("format", "string"))]
    amount = {"type": "object", "required": ["credits"], "properties": {"credits": money}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Gateway admin API", "version": "1",
                 "description": "Bearer GATEWAY_ADMIN_TOKEN. Credits are decimal strings; *_nano are integers."},
        "components": {"securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}}, "schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]}}}}},
            "Key": {"type": "object", "properties": {
                "id": {"type": "integer"}, "name": {"type": "string"}, "prefix": {"type": "string"},
                "state": {"enum": ["active", "revoked", "expired"]}, "balance": {"type": "string"},
                "balance_nano": {"type": "integer"}, "held": {"type": "string"},
                "requests_in_flight": {"type": "integer"}, "spent_today": {"type": "string"},
                "spent_this_month": {"type": "string"}, **fields}}}},
        "security": [{"admin": []}],
        "paths": {
            "/admin/api/keys": {
                "get": op("List keys with balances, holds and spend", {"type": "object"}),
                "post": op("Create a key; the secret is in `key`, shown once", key,
                           {"type": "object", "required": ["name", "credits"],
                            "properties": {**fields, "credits": money}}, status="201")},
            "/admin/api/keys/{key_id}": {
                "get": op("One key", key, params=key_id),
                "patch": op("Change name, limits or policies (null clears)", key,
                            {"type": "object", "properties": fields}, key_id)},
            "/admin/api/keys/{key_id}/topup": {"post": op("Add credits", key, amount, key_id)},
            "/admin/api/keys/{key_id}/correct": {"post": op(
                "Take credits back, as a 'correction' ledger row with a reason", key,
                {"type": "object", "required": ["credits", "reason"],
                 "properties": {"credits": money, "reason": {"type": "string"}}}, key_id)},
            "/admin/api/keys/{key_id}/revoke": {"post": op("Revoke a key", key, params=key_id)},
            "/admin/api/usage": {"get": op("Usage rows, newest first; format=csv for CSV", {"type": "object"},
                                           params=q)},
            "/admin/api/audit": {"get": op("Balance + holds = ledger, per key; stale holds", {"type": "object"})},
            "/metrics": {"get": {"summary": "Prometheus metrics (same Bearer token)",
                                 "responses": {"200": {"description": "text/plain; version=0.0.4"}}}},
        },
    }


def register(app: Flask) -> None:
    app.register_blueprint(bp)
    import admin_page
    admin_page.register(app)


__all__ = ["GatewayError", "register", "require_token"]
