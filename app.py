"""The gateway's Flask app, in the order of a request: authenticate, limit, parse, route, hold, call, settle.

`create_app()` builds it; the module-level `app` serves `gunicorn app:app` and `flask --app app ...`.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
import time
from datetime import UTC, datetime

from flask import Flask, Response, current_app, g, has_request_context, request
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded
from gunicorn.http.errors import ParseException
from limits.errors import ConfigurationError as LimitsConfigurationError
from werkzeug.exceptions import HTTPException

import admin
import chat
import cli
import config as config_mod
import db
import images
import keys
import metrics
import music
import policies
import selfservice
import tokens
import vision
from errors import AuthError, GatewayError, InvalidRequest, ModelNotFound, NotFound, PayloadTooLarge, RateLimited
from metering import Ticket

log = logging.getLogger("gateway")
request_log = logging.getLogger("gateway.request")  # the same logger metering writes settled requests to
# JSON nested deeper than this is refused: Python's parser and every recursive walk of a body after it (vision,
# token counting, re-encoding for the upstream) would otherwise die with RecursionError, a 500.
MAX_JSON_DEPTH = 200
_HTTP_CODES = {404: (NotFound, "not_found"), 405: (InvalidRequest, "method_not_allowed"),
               413: (PayloadTooLarge, "request_too_large")}


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
        log.propagate = False


def _seconds_left(reset: float, now: float) -> int:
    """Whole seconds until a window resets, rounded up: at most the window's length, at least 1."""
    return max(1, math.ceil(reset - now))


def _duration(seconds: int) -> str:
    """OpenAI's reset format: 1s, 6m0s, 1h2m3s."""
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m}m{s}s" if h else f"{m}m{s}s" if m else f"{s}s"


def create_app(cfg: config_mod.Config | None = None) -> Flask:
    """Build the app from a Config (default: config.toml or $GATEWAY_CONFIG)."""
    _setup_logging()
    cfg = cfg or config_mod.load()
    app = Flask(__name__)
    app.config["GATEWAY"] = cfg
    # A body with a Content-Length is checked against this before it is read (authenticate) and by Werkzeug;
    # a chunked one has none, and _read_body counts it instead (Werkzeug would stop at the limit silently).
    app.config["MAX_CONTENT_LENGTH"] = cfg.server.max_body_bytes
    database = cfg.server.database
    db.init(database)  # gunicorn's master did it already (on_starting); for `flask` commands this is the first
    tokens.seed_cache(os.path.join(os.path.dirname(database), ".tiktoken"))
    for model in cfg.models.values():
        upstream = cfg.upstream_for(model)
        if upstream.api_key_env and not upstream.api_key():
            log.warning("model %s: upstream %s has no key; set %s (calls answer 502 until then)",
                        model.id, upstream.name, upstream.api_key_env)
    vision.warn_if_loopback(cfg)
    started = int(os.path.getmtime(cfg.path)) if cfg.path and os.path.exists(cfg.path) else int(time.time())

    @app.before_request
    def authenticate() -> Response | None:
        """Runs before the limiter (registered first), so bad keys never spend anyone's budget."""
        g.request_id = "req_" + os.urandom(12).hex()
        g.api_key = None
        g.ticket = None
        if request.path == "/health":
            return None
        if request.path == "/metrics" or request.path.startswith("/admin"):
            return None  # policy hook: admin token, not a key (admin.py)
        length = request.content_length
        if length is not None and length > cfg.server.max_body_bytes:
            raise PayloadTooLarge(f"The request body is {length} bytes; the limit is {cfg.server.max_body_bytes}.")
        header = request.headers.get("Authorization", "")
        if not header:
            raise AuthError("You didn't provide an API key. Send it as 'Authorization: Bearer sk-...'.")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token.startswith("sk-"):
            raise AuthError("The Authorization header must be 'Bearer sk-...'.")
        key = keys.lookup(db.conn_for(database), token)
        if key is None:
            raise AuthError(f"Incorrect API key provided: {token[:6]}...{token[-4:]}.")
        policies.check_expiry(key)  # policy hook: 401 naming when the key expired
        g.api_key = key
        return None

    def limit_key() -> str:
        return f"key:{g.api_key.id}" if g.get("api_key") else ""

    def limit_string() -> str:
        key = g.get("api_key")
        if key is None:
            return ""
        rpm = cfg.limits.default_rpm if key.rpm is None else key.rpm
        rpd = cfg.limits.default_rpd if key.rpd is None else key.rpd
        return ";".join(f"{n}/{per}" for n, per in ((rpm, "minute"), (rpd, "day")) if n)  # 0 means unlimited

    # One budget per key shared by every route (ApplicationLimit), counted on arrival (RUNTIME.md 1.1).
    try:
        limiter = Limiter(limit_key, app=app, application_limits=[ApplicationLimit(limit_string)],
                          storage_uri=cfg.limits.storage_uri, strategy=cfg.limits.strategy, headers_enabled=False)
    except LimitsConfigurationError as exc:  # a scheme whose driver is not installed, or a malformed address
        raise config_mod.ConfigError(f"[limits].storage_uri {cfg.limits.storage_uri!r} cannot be used ({exc}); "
                                     "install its driver or use \"memory://\".") from None

    @app.after_request
    def finish(resp: Response) -> Response:
        resp.headers["x-request-id"] = g.get("request_id", "")
        if g.get("api_key") is not None:
            now = time.time()
            for rl in limiter.current_limits:
                suffix = "requests" if rl.limit.get_expiry() <= 60 else "requests-day"
                resp.headers[f"x-ratelimit-limit-{suffix}"] = str(rl.limit.amount)
                resp.headers[f"x-ratelimit-remaining-{suffix}"] = str(rl.remaining)
                # window[0] is the exact reset time; rl.reset_at is it already rounded up, one second too late.
                resp.headers[f"x-ratelimit-reset-{suffix}"] = _duration(_seconds_left(rl.window[0], now))
        _log_unsettled(resp)
        ticket = g.get("ticket")  # metrics hook: one count per answered request
        # The route label is the matched rule, never the raw path: random URLs must not grow the label set.
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.record_request(ticket.route if ticket is not None else rule,
                               ticket.model if ticket is not None else "", resp.status_code)
        return resp

    @app.errorhandler(GatewayError)
    def gateway_error(exc: GatewayError) -> Response:
        return _error_response(exc)

    @app.errorhandler(RateLimitExceeded)
    def rate_limited(exc: RateLimitExceeded) -> Response:
        item = exc.limit.limit
        per = "minute" if item.get_expiry() <= 60 else "day"
        breached = next((rl for rl in limiter.current_limits if rl.breached), limiter.current_limit)
        retry = _seconds_left(breached.window[0], time.time()) if breached else item.get_expiry()
        headers = {"Retry-After": str(retry)}
        metrics.LIMITED.labels(per).inc()  # metrics hook
        if per == "day":
            # The official SDKs honour x-should-retry before Retry-After: without it the Node SDK sleeps the
            # rest of the day inside one call, and openai-python gives up only after retrying in vain.
            headers["x-should-retry"] = "false"
            advice = f"The daily budget resets in {_duration(retry)}; ask the operator for a higher limit."
        else:
            advice = f"Please try again in {retry}s."
        return _error_response(RateLimited(
            f"Rate limit reached for requests per {per}: limit {item.amount}. {advice}", headers=headers))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        cls, code = _HTTP_CODES.get(exc.code or 500, (GatewayError, None))
        message = {404: f"Unknown request URL: {request.method} {request.path}.",
                   405: f"Method {request.method} is not allowed on {request.path}."}.get(exc.code, exc.description)
        return _error_response(cls(message, status=exc.code, code=code))

    @app.errorhandler(Exception)
    def crashed(exc: Exception) -> Response:
        log.exception("request_id=%s unhandled error", g.get("request_id"))
        return _error_response(GatewayError("The server had an error while processing your request."))

    @app.get("/health")
    @limiter.exempt
    def health() -> Response:
        now = datetime.now(UTC)
        return {"status": "OK", "timestamp": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"}

    def model_object(model: config_mod.ModelConfig) -> dict:
        return {"id": model.id, "object": "model", "created": started, "owned_by": cfg.server.owner,
                "mode": model.mode,
                "pricing": {"input_per_million_tokens": float(model.input_price),
                            "output_per_million_tokens": float(model.output_price),
                            "per_image": float(model.per_image), "per_second": float(model.per_second)},
                "capabilities": {"vision": model.vision, "streaming": model.mode == "chat"},
                "max_output_tokens": model.max_output_tokens}

    @app.get("/v1/models")
    def list_models() -> Response:
        shown = policies.visible(g.api_key, cfg.models.values())  # policy hook: only the key's allowed models
        return {"object": "list", "data": [model_object(m) for m in shown]}

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id: str) -> Response:
        model = cfg.models.get(model_id)
        if model is None or not policies.may_use(g.api_key, model_id):  # policy hook
            raise ModelNotFound(f"The model `{model_id}` does not exist or you do not have access to it.",
                                param="model")
        return model_object(model)

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        body = _json_body()
        chat.validate("chat", body)
        return chat.handle(_ticket(cfg, "chat.completions"), "chat", body, cfg.server.heartbeat_seconds)

    @app.post("/v1/completions")
    def completions() -> Response:
        body = _json_body()
        chat.validate("completions", body)
        return chat.handle(_ticket(cfg, "completions"), "completions", body, cfg.server.heartbeat_seconds)

    @app.post("/v1/images/generations")
    def images_generations() -> Response:
        return images.handle(_ticket(cfg, "images.generations"), _json_body())

    @app.post("/v1/audio/music")
    def audio_music() -> Response:
        return music.handle(_ticket(cfg, "audio.music"), _json_body())

    cli.register(app)
    admin.register(app)  # policy hook: /admin/api and the /admin page
    selfservice.register(app)  # policy hook: /v1/key and the dashboard/billing endpoints
    metrics.register(app)  # metrics hook: /metrics
    # Everything built so far lives as long as the worker; frozen, full collections no longer walk it.
    gc.freeze()
    # The default thresholds (700, 10, 10) collect so often that with 5,000 open streams the collector froze
    # the event loop for up to 100 ms while they were held and 300 ms while they opened (bench/, hold_5000).
    # At (50000, 20, 100): /health max 6.9 ms while held, longest stall 34 ms, memory per stream unchanged;
    # a full collection still runs about every 10^8 allocations, so cyclic garbage is still reclaimed.
    gc.set_threshold(50_000, 20, 100)
    return app


def _ticket(cfg: config_mod.Config, route: str) -> Ticket:
    """The request's bill, kept on flask.g so that the after_request hook can log a request that took no hold."""
    g.ticket = Ticket(cfg, g.api_key, g.request_id, route, "")
    return g.ticket


def _log_unsettled(resp: Response) -> None:
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


def _read_body(limit: int) -> bytes:
    """The raw body, at most limit bytes; 413 past it and 400 for a malformed chunked body.

    A Content-Length was checked against the limit before authentication. A chunked body has none, and
    Werkzeug's MAX_CONTENT_LENGTH silently stops at the limit, so the truncated body would be parsed as if
    whole; it is read here from gunicorn's stream instead, one byte past the limit to tell "exactly" from
    "over".
    """
    if request.content_length is not None:
        return request.get_data(cache=False)
    stream = request.environ["wsgi.input"]
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
        raise InvalidRequest(f"The chunked request body is malformed ({type(exc).__name__}); send a valid "
                             "chunked body or a Content-Length.", code="invalid_body") from None
    # gunicorn would drain the rest of an unbounded body before the next request; marked failed (gunicorn
    # 27's own flag for a body it cannot finish), the connection is closed after this answer instead.
    if hasattr(stream, "failed"):
        stream.failed = True
    raise PayloadTooLarge(f"The chunked request body is larger than the limit of {limit} bytes.")


def _json_depth_ok(value: object) -> bool:
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


def _json_body() -> dict:
    """The request's JSON object, or OpenAI's 400 for anything else."""
    raw = _read_body(current_app.config["GATEWAY"].server.max_body_bytes)
    too_deep = InvalidRequest(f"The JSON body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; "
                              "flatten it.", code="invalid_json")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise too_deep from None
    except ValueError:
        raise InvalidRequest("We could not parse the JSON body of your request. Send a valid JSON object.",
                             code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    # Counting brackets is C-fast; only a body that could be that deep is walked.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and not _json_depth_ok(body):
        raise too_deep
    return body


def _error_response(exc: GatewayError) -> Response:
    if has_request_context():
        g.error_code = exc.code or exc.type
    resp = Response(json.dumps(exc.body()), status=exc.status, mimetype="application/json")
    for name, value in exc.headers.items():
        resp.headers[name] = value
    return resp


def _module_app() -> Flask:
    try:
        return create_app()
    except config_mod.ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        # 3 is gunicorn's "worker failed to boot": the master stops with this sentence instead of respawning.
        raise SystemExit(3) from None


app = _module_app()
