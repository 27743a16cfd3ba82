"""The HTTP routes, one blueprint per route family; register(app) adds them all.

Every view does the same four things in the same order: read its JSON body (json_body), check it
(validation.py), open the request's billing ticket (ticket), and hand both to its handler.
"""
from __future__ import annotations

import json

from flask import Flask, current_app, g, request
from gunicorn.http.errors import ParseException

from billing import Ticket
from config import ModelConfig, UpstreamConfig
from errors import BadRequestError, PayloadTooLargeError
from providers.http import require_key

# JSON nested deeper than this is refused: Python's parser and every recursive walk of a body after it (vision,
# token counting, re-encoding for the upstream) would otherwise die with RecursionError, a 500.
MAX_JSON_DEPTH = 200


def ticket(route: str) -> Ticket:
    """The request's bill, kept on flask.g so that auth's after_request hook can log a request that took no hold."""
    ctx = g._get_current_object()  # one context-local lookup, not four
    ctx.ticket = t = Ticket(current_app.config["GATEWAY"], ctx.api_key, ctx.request_id, route, "")
    return t


def resolve(t: Ticket, name: object, mode: str, default: str | None = None) -> tuple[ModelConfig, UpstreamConfig]:
    """The model a request names (or the route's default) and its upstream, noted on the ticket; 404/400 for a
    model it cannot use, and 502 when the upstream's key is not set, all before any credit moves."""
    model, upstream = t.cfg.model_for(name, mode, default)
    t.model = model.id
    require_key(upstream)
    return model, upstream


def _read_body(limit: int) -> bytes:
    """The raw body, at most limit bytes; 413 past it and 400 for a malformed chunked body.

    A Content-Length was checked against the limit before authentication. A chunked body has none, and
    Werkzeug's MAX_CONTENT_LENGTH silently stops at the limit, so the truncated body would be parsed as if
    whole; it is read here from gunicorn's stream instead, one byte past the limit to tell "exactly" from
    "over".
    """
    stream = request.environ["wsgi.input"]
    length = request.content_length
    if length is not None:
        # Read straight from the server's stream: Werkzeug's get_data wraps it in a LimitedStream first, 2% of
        # a plain request's CPU. authenticate() has already refused a length past the limit; this is its guard.
        if length > limit:
            raise PayloadTooLargeError(f"The request body is {length} bytes; the limit is {limit}.")
        data = stream.read(length) if length else b""
        if len(data) < length:  # the client hung up inside its body (Werkzeug's ClientDisconnected)
            raise BadRequestError(f"The request body ended after {len(data)} of its {length} bytes.",
                                  code="invalid_body")
        return data
    parts, size = [], 0
    try:
        while size <= limit:
            chunk = stream.read(min(65536, limit + 1 - size))
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
            size += len(chunk)
    except (OSError, ValueError, ParseException) as exc:  # InvalidChunkSize, ChunkMissingTerminator, NoMoreData
        # gunicorn marks the body failed itself, and closes the connection after this answer.
        raise BadRequestError(f"The chunked request body is malformed ({type(exc).__name__}); send a valid "
                              "chunked body or a Content-Length.", code="invalid_body") from None
    # gunicorn would drain the rest of an unbounded body before the next request; marked failed (gunicorn
    # 27's own flag for a body it cannot finish), the connection is closed after this answer instead.
    if hasattr(stream, "failed"):
        stream.failed = True
    raise PayloadTooLargeError(f"The chunked request body is larger than the limit of {limit} bytes.")


def json_depth_ok(value: object) -> bool:
    """Whether value nests at most MAX_JSON_DEPTH arrays and objects, walked without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return True


def json_body() -> dict:
    """The request's JSON object, or OpenAI's 400 for anything else."""
    raw = _read_body(current_app.config["GATEWAY"].server.max_body_bytes)
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except ValueError:
        raise BadRequestError("We could not parse the JSON body of your request. Send a valid JSON object.",
                              code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object.", code="invalid_json")
    # Counting brackets is C-fast; only a body that could be that deep is walked.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and not json_depth_ok(body):
        raise _too_deep()
    return body


def _too_deep() -> BadRequestError:
    # Built only when raised: an exception's construction is a few microseconds of every request otherwise.
    return BadRequestError(f"The JSON body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; "
                           "flatten it.", code="invalid_json")


def register(app: Flask) -> None:
    from routes import audio, chat, embeddings, images, models, moderations, music, responses

    for module in (models, chat, responses, embeddings, images, music, audio, moderations):
        app.register_blueprint(module.bp)
