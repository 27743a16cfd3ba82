"""Who is asking: the API key of every request but /health, checked before the limiter counts anything.

Also the request's id (x-request-id) and the one log line of every request that took no credit hold (refusals,
model listings, health checks); a request that took a hold is logged once by billing.Ticket.settle instead.
"""
from __future__ import annotations

import logging
import os

from flask import Flask, Response, current_app, g, request

import db
import keys
import metrics
import policies
from errors import AuthenticationError, PayloadTooLargeError

# The audio upload routes and their body limit (routes/audio.py reads the same numbers).
UPLOAD_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")
UPLOAD_BODY_BYTES = 26 * 1024 * 1024

request_log = logging.getLogger("gateway.request")  # the logger billing.Ticket writes settled requests to


def authenticate() -> None:
    """Registered before the limiter, so bad keys never spend anyone's budget."""
    cfg = current_app.config["GATEWAY"]
    g.request_id = "req_" + os.urandom(12).hex()
    g.api_key = None
    g.ticket = None
    if request.path == "/health":
        return
    if request.path == "/metrics" or request.path.startswith("/admin"):
        return  # policy hook: these take the admin token, not a key (admin.require_token)
    length = request.content_length
    limit = cfg.server.max_body_bytes
    if request.path in UPLOAD_PATHS:  # audio uploads may be up to OpenAI's 25 MB whatever the JSON limit is
        limit = max(limit, UPLOAD_BODY_BYTES)
    if length is not None and length > limit:
        raise PayloadTooLargeError(f"The request body is {length} bytes; the limit is {limit}.")
    header = request.headers.get("Authorization", "")
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
    g.api_key = key


def finish(resp: Response) -> Response:
    resp.headers["x-request-id"] = g.get("request_id", "")
    log_unsettled(resp)
    ticket = g.get("ticket")  # metrics hook: one count per answered request
    # The route label is the matched rule, never the raw path: random URLs must not grow the label set.
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.record_request(ticket.route if ticket is not None else rule,
                           ticket.model if ticket is not None else "", resp.status_code)
    return resp


def log_unsettled(resp: Response) -> None:
    """One log line for every request whose ticket took no hold: refusals (400, 401, 402, 404, 413, 429),
    model listings, health checks. Requests that took a hold are logged once by Ticket.settle, also when a
    stream ends long after this hook ran. Never a key (only a valid key's stored prefix) nor a prompt."""
    ticket = g.get("ticket")
    if ticket is not None and ticket.hold is not None:
        return
    key = g.get("api_key")
    route = ticket.route if ticket is not None else request.path
    level = logging.DEBUG if request.path == "/health" and resp.status_code == 200 else logging.INFO
    request_log.log(level, "request_id=%s key=%s route=%s model=%s status=%s error=%s", g.get("request_id", "-"),
                    key.prefix if key is not None else "-", route, (ticket.model if ticket is not None else "") or "-",
                    resp.status_code, g.get("error_code") or "-")


def register(app: Flask) -> None:
    """Call before ratelimit.register: Flask runs before_request hooks in registration order."""
    app.before_request(authenticate)
    app.after_request(finish)
