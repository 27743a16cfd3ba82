"""The admin web page under /admin/: server-rendered templates, no JavaScript build step.

Sign-in takes the admin token once and sets Flask's signed session cookie (HttpOnly, SameSite=Strict, path
/admin), signed with a key derived from the token, so changing the token signs everyone out. Every form
carries the session's CSRF token, checked in constant time. The page calls the same functions as the admin
API (admin.py), which call the same functions as the CLI.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any

from flask import Blueprint, Flask, Response, redirect, render_template, request, session, url_for

import admin
import billing
import policies
from errors import BadRequestError, GatewayError

SESSION_SECONDS = 12 * 3600
bp = Blueprint("admin_page", __name__, url_prefix="/admin", static_folder="static/admin",
               static_url_path="/static")


def _signed_in() -> bool:
    return bool(session.get("admin")) and time.time() - float(session.get("at", 0)) < SESSION_SECONDS


@bp.before_request
def _guard() -> Response | None:
    if not admin.admin_token():
        raise admin.not_found()
    if request.endpoint in ("admin_page.login", "admin_page.static"):
        return None
    if not _signed_in():
        if request.method == "GET":
            return _html(render_template("admin/login.html", error=None), 200)
        return redirect(url_for("admin_page.login"))
    if request.method == "POST":
        given = request.form.get("csrf", "")
        if not hmac.compare_digest(given.encode(), str(session.get("csrf", "")).encode()):
            return _html(render_template("admin/login.html", error="The form expired; sign in again."), 403)
    return None


@bp.after_request
def _headers(resp: Response) -> Response:
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                               "script-src 'self'; form-action 'self'; frame-ancestors 'none'")
    return resp


def _html(text: str, status: int = 200) -> Response:
    return Response(text, status=status, mimetype="text/html")


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response:
    if request.method == "GET":
        return _html(render_template("admin/login.html", error=None))
    try:
        ok = admin.check_token(request.form.get("token", ""), request.remote_addr or "-")
    except GatewayError as exc:  # throttled
        return _html(render_template("admin/login.html", error=exc.message), exc.status)
    if not ok:
        return _html(render_template("admin/login.html", error="That is not the admin token."), 401)
    session.clear()
    session["admin"] = True
    session["at"] = time.time()
    session["csrf"] = secrets.token_urlsafe(24)
    return redirect(url_for("admin_page.keys_page"))


@bp.post("/logout")
def logout() -> Response:
    session.clear()
    return redirect(url_for("admin_page.login"))


def _page(template: str, status: int = 200, **context: Any) -> Response:
    return _html(render_template(template, csrf=session.get("csrf", ""), **context), status)


@bp.get("/")
def keys_page(created: dict | None = None, error: str | None = None, status: int = 200) -> Response:
    return _page("admin/keys.html", status, keys=admin.list_keys(), created=created, error=error,
                 message=request.args.get("msg"))


def _form_changes() -> dict[str, Any]:
    """The policy/limit fields of a form; empty inputs clear a value."""
    form = {k: v.strip() for k, v in request.form.items() if k not in ("csrf", "credits")}
    if "allowed_models" in form:
        form["allowed_models"] = form["allowed_models"] or None
    return form


@bp.post("/keys")
def create() -> Response:
    fields = _form_changes()
    fields["credits"] = request.form.get("credits", "").strip()
    fields = {k: v for k, v in fields.items() if v not in ("", None) or k in ("name", "credits")}
    try:
        doc, secret = admin.create_key(fields)
    except BadRequestError as exc:
        return keys_page(error=exc.message, status=400)
    return keys_page(created={"key": doc, "secret": secret}, status=201)


@bp.get("/keys/<int:key_id>")
def key_page(key_id: int, error: str | None = None, status: int = 200) -> Response:
    key = admin.get_key(key_id)
    return _page("admin/key.html", status, key=key, error=error, message=request.args.get("msg"),
                 usage=admin.query_usage({"key_id": str(key_id), "limit": "20"})["data"])


def _back(key_id: int, msg: str) -> Response:
    return redirect(url_for("admin_page.key_page", key_id=key_id, msg=msg))


@bp.post("/keys/<int:key_id>/topup")
def topup(key_id: int) -> Response:
    try:
        doc = admin.topup_key(key_id, admin.parse_amount(request.form.get("credits", "").strip()))
    except BadRequestError as exc:
        return key_page(key_id, error=exc.message, status=400)
    return _back(key_id, f"Topped up; the balance is now {doc['balance']} credits.")


@bp.post("/keys/<int:key_id>/correct")
def correct(key_id: int) -> Response:
    try:
        doc = admin.correct_key(key_id, admin.parse_amount(request.form.get("credits", "").strip()),
                                request.form.get("reason", ""))
    except BadRequestError as exc:
        return key_page(key_id, error=exc.message, status=400)
    return _back(key_id, f"Corrected; the balance is now {doc['balance']} credits.")


@bp.post("/keys/<int:key_id>/revoke")
def revoke(key_id: int) -> Response:
    admin.revoke_key(key_id)
    return _back(key_id, "Revoked: requests with this key are refused from now on.")


@bp.post("/keys/<int:key_id>/update")
def update(key_id: int) -> Response:
    fields = _form_changes()
    for name in ("rpm", "rpd", "expires_at", "daily_cap", "monthly_cap"):
        if fields.get(name) == "":
            fields[name] = None
    try:
        admin.update_key(key_id, fields)
    except BadRequestError as exc:
        return key_page(key_id, error=exc.message, status=400)
    return _back(key_id, "Saved.")


def _chart(days: list[tuple[str, int]]) -> dict:
    """Bars for an inline SVG: one per day, scaled to the largest, with a few labelled gridlines."""
    width, height, left, right, bottom = 960, 190, 96, 28, 24
    top = max((v for _, v in days), default=0) or 1
    slot = (width - left - right) / len(days)
    bars = []
    for i, (day, value) in enumerate(days):
        h = round((height - bottom - 8) * value / top, 1)
        bars.append({"x": round(left + i * slot + 1, 1), "y": round(height - bottom - h, 1), "w": round(slot - 2, 1),
                     "h": h, "day": day, "value": billing.format_credits(value),
                     "label": day[5:] if i % 5 == 0 or i == len(days) - 1 else ""})
    grid = [{"y": round(height - bottom - (height - bottom - 8) * f, 1), "label": billing.format_credits(int(top * f))}
            for f in (0, 0.5, 1)]
    return {"width": width, "height": height, "left": left, "right": width - right, "bottom": bottom, "bars": bars,
            "grid": grid, "total": billing.format_credits(sum(v for _, v in days))}


@bp.get("/usage")
def usage_page() -> Response:
    args = {k: v for k, v in request.args.items() if v}
    error = None
    try:
        page = admin.query_usage({**args, "limit": args.get("limit", "50")})
    except BadRequestError as exc:
        page, error = {"data": [], "next_cursor": None}, exc.message
    key_id = args.get("key_id")
    days = admin.run(lambda conn: billing.spend_by_day(conn, 30, int(key_id) if key_id and key_id.isdigit()
                                                       else None))
    return _page("admin/usage.html", 400 if error else 200, rows=page["data"], next_cursor=page["next_cursor"],
                 filters=args, error=error, chart=_chart(days))


@bp.get("/audit")
def audit_page() -> Response:
    return _page("admin/audit.html", result=admin.audit_doc())


def register(app: Flask) -> None:
    token = admin.admin_token()
    if token:
        # The session key is derived from the token: a new token ends every session signed with the old one.
        app.secret_key = hmac.new(token.encode(), b"gateway-admin-session", hashlib.sha256).hexdigest()
    app.config.update(SESSION_COOKIE_NAME="gateway_admin", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_PATH="/admin")
    app.jinja_env.globals["when"] = policies.when
    app.register_blueprint(bp)
