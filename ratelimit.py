"""Per-key rate limits: one budget per key shared by every route, counted on arrival (docs/runtime.md,
"Flask-Limiter"), the x-ratelimit headers on every authenticated answer, and the 429 with Retry-After."""
from __future__ import annotations

import math
import time

from flask import Flask, Response, current_app, g
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded
from limits.errors import ConfigurationError as LimitsConfigurationError

import metrics
from errors import ConfigError, RateLimitError, render


def seconds_left(reset: float, now: float) -> int:
    """Whole seconds until a window resets, rounded up: at most the window's length, at least 1."""
    return max(1, math.ceil(reset - now))


def duration(seconds: int) -> str:
    """OpenAI's reset format: 1s, 6m0s, 1h2m3s."""
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m}m{s}s" if h else f"{m}m{s}s" if m else f"{s}s"


def _limit_key() -> str:
    return f"key:{g.api_key.id}" if g.get("api_key") else ""


def _limit_string() -> str:
    key = g.get("api_key")
    if key is None:
        return ""
    cfg = current_app.config["GATEWAY"].limits
    rpm = cfg.default_rpm if key.rpm is None else key.rpm
    rpd = cfg.default_rpd if key.rpd is None else key.rpd
    return ";".join(f"{n}/{per}" for n, per in ((rpm, "minute"), (rpd, "day")) if n)  # 0 means unlimited


def register(app: Flask) -> Limiter:
    """The limiter, after auth.register (its before_request must run after authentication)."""
    cfg = app.config["GATEWAY"]
    try:
        limiter = Limiter(_limit_key, app=app, application_limits=[ApplicationLimit(_limit_string)],
                          storage_uri=cfg.limits.storage_uri, strategy=cfg.limits.strategy, headers_enabled=False)
    except LimitsConfigurationError as exc:  # a scheme whose driver is not installed, or a malformed address
        raise ConfigError(f"[limits].storage_uri {cfg.limits.storage_uri!r} cannot be used ({exc}); "
                          "install its driver or use \"memory://\".") from None

    @app.after_request
    def headers(resp: Response) -> Response:
        if g.get("api_key") is not None:
            now = time.time()
            for rl in limiter.current_limits:
                suffix = "requests" if rl.limit.get_expiry() <= 60 else "requests-day"
                resp.headers[f"x-ratelimit-limit-{suffix}"] = str(rl.limit.amount)
                resp.headers[f"x-ratelimit-remaining-{suffix}"] = str(rl.remaining)
                # window[0] is the exact reset time; rl.reset_at is it already rounded up, one second too late.
                resp.headers[f"x-ratelimit-reset-{suffix}"] = duration(seconds_left(rl.window[0], now))
        return resp

    @app.errorhandler(RateLimitExceeded)
    def rate_limited(exc: RateLimitExceeded) -> Response:
        item = exc.limit.limit
        per = "minute" if item.get_expiry() <= 60 else "day"
        breached = next((rl for rl in limiter.current_limits if rl.breached), limiter.current_limit)
        retry = seconds_left(breached.window[0], time.time()) if breached else item.get_expiry()
        headers = {"Retry-After": str(retry)}
        metrics.LIMITED.labels(per).inc()  # metrics hook
        if per == "day":
            # The official SDKs honour x-should-retry before Retry-After: without it the Node SDK sleeps the
            # rest of the day inside one call, and openai-python gives up only after retrying in vain.
            headers["x-should-retry"] = "false"
            advice = f"The daily budget resets in {duration(retry)}; ask the operator for a higher limit."
        else:
            advice = f"Please try again in {retry}s."
        return render(RateLimitError(
            f"Rate limit reached for requests per {per}: limit {item.amount}. {advice}", headers=headers))

    app.extensions["gateway_limiter"] = limiter
    return limiter
