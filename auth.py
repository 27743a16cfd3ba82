"""Who is asking: the API key of every request but /health, checked before the limiter counts anything.

Also the request's id (x-request-id) and the one log line of every request that took no credit hold (refusals,
model listings, health checks); a request that took a hold is logged once by billing.Ticket.settle instead.
"""
from __future__ import annotations

import logging
import os

from flask import Flask, Request, Response, current_app, g, request
from flask.ctx import _AppCtxGlobals

import db
import keys
import metrics
import policies
from errors import AuthenticationError, PayloadTooLargeError

# The audio upload routes and their body limit (routes/audio.py reads the same numbers).
UPLOAD_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")
UPLOAD_BODY_BYTES = 26 * 1024 * 1024

request_log = logging.getLogger("gateway.request")  # the logger billing.Ticket writes settled requests to

_ID_BYTES = 12
_id_pool = b""  # kernel randomness for request ids, fetched a batch at a time
_id_at = 0


def new_request_id() -> str:
    """'req_' and 24 random hex digits, as os.urandom(12) gives them, from one getrandom() per 1,024 ids
    instead of one per request. Nothing yields in here, so two greenlets never take the same bytes."""
    global _id_pool, _id_at
    at = _id_at
    if at + _ID_BYTES > len(_id_pool):
        _id_pool, at = os.urandom(_ID_BYTES * 1024), 0
    _id_at = at + _ID_BYTES
    return "req_" + _id_pool[at:at + _ID_BYTES].hex()


def _forget_ids() -> None:
    global _id_pool, _id_at
    _id_pool, _id_at = b"", 0


os.register_at_fork(after_in_child=_forget_ids)  # a forked worker must never reuse its parent's ids


def authenticate() -> None:
    """Registered before the limiter, so bad keys never spend anyone's budget."""
    # Each name below is a context-local proxy: looked up once here rather than on every use (11 lookups).
    req = request._get_current_object()
    ctx = g._get_current_object()
    cfg = current_app.config["GATEWAY"]
    ctx.request_id = new_request_id()
    ctx.api_key = None
    ctx.ticket = None
    path = req.path
    if path == "/health":
        return
    if path == "/metrics" or path.startswith("/admin"):
        return  # policy hook: these take the admin token, not a key (admin.require_token)
    length = req.content_length
    limit = cfg.server.max_body_bytes
    if path in UPLOAD_PATHS:  # audio uploads may be up to OpenAI's 25 MB whatever the JSON limit is
        limit = max(limit, UPLOAD_BODY_BYTES)
    if length is not None and length > limit:
        raise PayloadTooLargeError(f"The request body is {length} bytes; the limit is {limit}.")
    header = req.headers.get("Authorization", "")
    if not header:
        raise AuthenticationError("You didn't provide an API key. Send it as 'Authorization: Bearer sk-...'.")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith("sk-"):
        raise AuthenticationError("The Authorization header must be 'Bearer sk-...'.")
    key = keys.lookup(db.conn_for(cfg.server.database), token)
    if key is None:
        raise AuthenticationError(f"Incorrect API key provided: {token[:6]}...{token[-4:]}.")
    policies.check_expiry(key)  # policy hook: 401 naming when the key expired
    ctx.api_key = key


def finish(resp: Response) -> Response:
    ctx = g._get_current_object()
    req = request._get_current_object()
    resp.headers["x-request-id"] = ctx.get("request_id", "")
    ticket = ctx.get("ticket")
    log_unsettled(resp, ctx, req)
    # metrics hook: one count per answered request. The route label is the matched rule, never the raw path:
    # random URLs must not grow the label set.
    rule = req.url_rule.rule if req.url_rule is not None else "unmatched"
    metrics.record_request(ticket.route if ticket is not None else rule,
                           ticket.model if ticket is not None else "", resp.status_code)
    return resp


def log_unsettled(resp: Response, ctx: _AppCtxGlobals, req: Request) -> None:
    """One log line for every request whose ticket took no hold: refusals (400, 401, 402, 404, 413, 429),
    model listings, health checks. Requests that took a hold are logged once by Ticket.settle, also when a
    stream ends long after this hook ran. Never a key (only a valid key's stored prefix) nor a prompt.
    ctx and req: flask.g and flask.request, as finish() has them."""
    ticket = ctx.get("ticket")
    if ticket is not None and ticket.hold is not None:
        return
    path = req.path
    key = ctx.get("api_key")
    route = ticket.route if ticket is not None else path
    level = logging.DEBUG if path == "/health" and resp.status_code == 200 else logging.INFO
    request_log.log(level, "request_id=%s key=%s route=%s model=%s status=%s error=%s", ctx.get("request_id", "-"),
                    key.prefix if key is not None else "-", route, (ticket.model if ticket is not None else "") or "-",
                    resp.status_code, ctx.get("error_code") or "-")


def register(app: Flask) -> None:
    """Call before ratelimit.register: Flask runs before_request hooks in registration order."""
    app.before_request(authenticate)
    app.after_request(finish)
