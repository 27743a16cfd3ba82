"""The gateway's Flask app, in the order of a request: authenticate, limit, parse, route, hold, call, settle.

`create_app()` builds it; the module-level `app` serves `gunicorn app:app` and `flask --app app ...`.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime

from flask import Flask, Response, g, request
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded
from werkzeug.exceptions import HTTPException

import chat
import cli
import config as config_mod
import db
import images
import keys
import music
import tokens
import vision
from errors import AuthError, GatewayError, InvalidRequest, ModelNotFound, NotFound, PayloadTooLarge, RateLimited
from metering import Ticket

log = logging.getLogger("gateway")
_HTTP_CODES = {404: (NotFound, "not_found"), 405: (InvalidRequest, "method_not_allowed"),
               413: (PayloadTooLarge, "request_too_large")}


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
        log.propagate = False


def _duration(seconds: float) -> str:
    """OpenAI's reset format: 1s, 6m0s, 1h2m3s."""
    seconds = max(0, int(seconds + 0.999))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m}m{s}s" if h else f"{m}m{s}s" if m else f"{s}s"


def create_app(cfg: config_mod.Config | None = None) -> Flask:
    """Build the app from a Config (default: config.toml or $GATEWAY_CONFIG)."""
    _setup_logging()
    cfg = cfg or config_mod.load()
    app = Flask(__name__)
    app.config["GATEWAY"] = cfg
    # Chunked bodies have no Content-Length to check up front; Werkzeug stops reading them at this size.
    app.config["MAX_CONTENT_LENGTH"] = cfg.server.max_body_bytes
    database = cfg.server.database
    db.init(database)
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
        if request.path == "/health":
            return None
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
    limiter = Limiter(limit_key, app=app, application_limits=[ApplicationLimit(limit_string)],
                      storage_uri=cfg.limits.storage_uri, strategy=cfg.limits.strategy, headers_enabled=False)

    @app.after_request
    def finish(resp: Response) -> Response:
        resp.headers["x-request-id"] = g.get("request_id", "")
        if g.get("api_key") is not None:
            now = time.time()
            for rl in limiter.current_limits:
                suffix = "requests" if rl.limit.get_expiry() <= 60 else "requests-day"
                resp.headers[f"x-ratelimit-limit-{suffix}"] = str(rl.limit.amount)
                resp.headers[f"x-ratelimit-remaining-{suffix}"] = str(rl.remaining)
                resp.headers[f"x-ratelimit-reset-{suffix}"] = _duration(rl.reset_at - now)
        return resp

    @app.errorhandler(GatewayError)
    def gateway_error(exc: GatewayError) -> Response:
        return _error_response(exc)

    @app.errorhandler(RateLimitExceeded)
    def rate_limited(exc: RateLimitExceeded) -> Response:
        item = exc.limit.limit
        per = "minute" if item.get_expiry() <= 60 else "day"
        current = limiter.current_limit
        retry = max(1, int(current.reset_at - time.time() + 0.999)) if current else item.get_expiry()
        return _error_response(RateLimited(
            f"Rate limit reached for requests per {per}: limit {item.amount}. Please try again in {retry}s.",
            headers={"Retry-After": str(retry)}))

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
        return {"object": "list", "data": [model_object(m) for m in cfg.models.values()]}

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id: str) -> Response:
        model = cfg.models.get(model_id)
        if model is None:
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
    # Everything built so far lives as long as the worker; frozen, full collections no longer walk it.
    gc.freeze()
    # The default thresholds (700, 10, 10) collect so often that with 5,000 open streams the collector froze
    # the event loop for up to 100 ms while they were held and 300 ms while they opened (bench/, hold_5000).
    # At (50000, 20, 100): /health max 6.9 ms while held, longest stall 34 ms, memory per stream unchanged;
    # a full collection still runs about every 10^8 allocations, so cyclic garbage is still reclaimed.
    gc.set_threshold(50_000, 20, 100)
    return app


def _ticket(cfg: config_mod.Config, route: str) -> Ticket:
    return Ticket(cfg, g.api_key, g.request_id, route, "")


def _json_body() -> dict:
    """The request's JSON object, or OpenAI's 400 for anything else."""
    raw = request.get_data(cache=False)
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidRequest("We could not parse the JSON body of your request. Send a valid JSON object.",
                             code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def _error_response(exc: GatewayError) -> Response:
    resp = Response(json.dumps(exc.body()), status=exc.status, mimetype="application/json")
    for name, value in exc.headers.items():
        resp.headers[name] = value
    return resp


def _module_app() -> Flask:
    try:
        return create_app()
    except config_mod.ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


app = _module_app()
