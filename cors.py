"""CORS for browser clients: `[server] cors_origins` lists the origins whose pages may call the gateway.

An allowed origin's preflight (OPTIONS with Access-Control-Request-Method) is answered 204 here, before
authentication and the limiter: a browser sends no Authorization header on a preflight, and a preflight is no
request to count. Every answer to an allowed origin then carries Access-Control-Allow-Origin (that origin),
Vary: Origin, and Access-Control-Expose-Headers naming the headers a page needs to read.

An origin not on the list gets no CORS header at all, and its preflight goes on to authentication like any
request (so 401, as before CORS existed): the browser then refuses the call itself. Answering it 403 instead
would tell a stranger which origins are not allowed and change nothing for them.
"""
from __future__ import annotations

from flask import Flask, Response, current_app, g, request

import auth

ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, OpenAI-Organization, OpenAI-Project, OpenAI-Beta, X-Stainless-*"
EXPOSE_HEADERS = ", ".join((
    "x-request-id", "retry-after", "x-credits-charged", "x-credits-remaining",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-requests-day", "x-ratelimit-remaining-requests-day", "x-ratelimit-reset-requests-day",
    "x-vision-images"))
MAX_AGE = "600"  # seconds a browser may reuse a preflight (Chrome caps it at 7200)


def allowed_origin() -> str | None:
    """The request's Origin when the config allows it, else None."""
    origins = current_app.config["GATEWAY"].server.cors_origins
    origin = request.headers.get("Origin")
    if not origins or not origin:
        return None
    return origin if "*" in origins or origin.rstrip("/") in origins else None


def preflight() -> Response | None:
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return None
    origin = allowed_origin()
    if origin is None:
        return None
    # Browsers send the headers they want to use; echoing them lets any SDK's own x-stainless-* headers through.
    wanted = request.headers.get("Access-Control-Request-Headers")
    g.request_id = auth.new_request_id()  # auth, which would give it one, does not run for a preflight
    resp = Response(status=204)
    resp.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
    resp.headers["Access-Control-Allow-Headers"] = wanted or ALLOW_HEADERS
    resp.headers["Access-Control-Max-Age"] = MAX_AGE
    return resp


def add_headers(resp: Response) -> Response:
    origin = allowed_origin()
    if origin is not None:
        resp.headers["Access-Control-Allow-Origin"] = origin
        resp.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        resp.headers.add("Vary", "Origin")
    return resp


def register(app: Flask) -> None:
    """Call before auth.register: the preflight must be answered before the key is asked for.

    Without cors_origins (the default) no origin is allowed, and both hooks would only ever return what they
    were given: they are not registered, and no request pays for them."""
    if not app.config["GATEWAY"].server.cors_origins:
        return
    app.before_request(preflight)
    app.after_request(add_headers)
