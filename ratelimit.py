"""Per-key rate limits: one budget per key shared by every route, counted on arrival (docs/runtime.md,
"Rate limits"), the x-ratelimit headers on every authenticated answer, and the 429 with Retry-After.

Every request with limits asks a Counter once for all of its windows (a minute and a day) and gets back, per
window, its count and when it resets: what the headers and the 429 need, without a second read. Three counters:

- fixed-window in memory:// (the default): a dict in the worker, exact with one worker;
- fixed-window in Redis: one round trip per request, a Lua script (loaded once, run by EVALSHA) that counts
  and reads both windows atomically, so several workers share exact counts;
- any other strategy or store: the `limits` library (a hit and a window read per limit, as Flask-Limiter did).

The fixed-window semantics are the `limits` library's, so switching between these changes no answer: a window
opens at its first hit and lasts its length; every request counts, refused ones too (a client hammering through
a 429 keeps itself refused, as before); a window is breached once its count passes its amount; the amount is
part of the counter's name, so changing a key's limit starts a fresh window.
"""
from __future__ import annotations

import math
import threading
import time
from typing import NamedTuple

from flask import Flask, Response, current_app, g

import db
import metrics
from errors import ConfigError, GatewayError, RateLimitError

MINUTE, DAY = 60, 86400


class Window(NamedTuple):
    """One limit's state right after this request counted itself in it."""

    amount: int
    seconds: int
    count: int
    reset: float  # epoch seconds at which the window ends

    @property
    def remaining(self) -> int:
        return max(0, self.amount - self.count)

    @property
    def breached(self) -> bool:
        return self.count > self.amount


def seconds_left(reset: float, now: float) -> int:
    """Whole seconds until a window resets, rounded up: at most the window's length, at least 1."""
    return max(1, math.ceil(reset - now))


def duration(seconds: int) -> str:
    """OpenAI's reset format: 1s, 6m0s, 1h2m3s."""
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m}m{s}s" if h else f"{m}m{s}s" if m else f"{s}s"


class Counter:
    """Counts one request in each of a key's windows and returns them; the one interface the app uses."""

    def hit(self, key: str, limits: list[tuple[int, int]]) -> list[Window]:
        raise NotImplementedError


class MemoryCounter(Counter):
    """Fixed windows in the worker's memory. One entry per key and window length, so it is bounded by the
    number of keys; nothing yields in here, so greenlets cannot interleave a count."""

    def __init__(self) -> None:
        self.windows: dict[tuple[str, int, int], list[float]] = {}  # (key, amount, seconds) -> [ends at, count]

    def hit(self, key: str, limits: list[tuple[int, int]]) -> list[Window]:
        now = time.time()
        out = []
        for amount, seconds in limits:
            entry = self.windows.get((key, amount, seconds))
            if entry is None or entry[0] <= now:
                entry = self.windows[(key, amount, seconds)] = [now + seconds, 0]
            entry[1] += 1
            out.append(Window(amount, seconds, int(entry[1]), entry[0]))
        return out


# KEYS: one counter per window; ARGV: each window's length in milliseconds. Returns count, ms left per window.
# The same counting as `limits`' Redis fixed window (INCR, the expiry set by the first hit), for all windows in
# one atomic step; a counter found without an expiry (left by an interrupted older write) gets one.
_LUA_FIXED = """
local out = {}
for i, key in ipairs(KEYS) do
  local count = redis.call('INCR', key)
  local ttl = -1
  if count > 1 then ttl = redis.call('PTTL', key) end
  if ttl < 0 then
    ttl = tonumber(ARGV[i])
    redis.call('PEXPIRE', key, ttl)
  end
  out[2 * i - 1] = count
  out[2 * i] = ttl
end
return out
"""


STORE_TIMEOUT_SECONDS = 2.0  # a Redis slower than this for one small script is treated as down


class RedisCounter(Counter):
    """Fixed windows in Redis in one round trip per request: EVALSHA of a script loaded once per worker, sent on a
    connection of redis-py's pool directly. A store that does not answer within STORE_TIMEOUT_SECONDS is down (a
    503), not a request that hangs.

    redis-py's command layer (Script, execute_command, its retry wrapper, the response callbacks) cost about
    100 µs of Python a call, as much as the round trip itself (docs/performance.md, round 5); the pool, the
    connection, the protocol and the errors stay redis-py's. A server that lost its scripts (a restart, SCRIPT
    FLUSH) gets the script again; a connection that broke (a restart) is made again, once.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._pid = 0
        self._pool = None
        self._sha = ""
        # Greenlets that arrive together at a worker's start wait for the first one's client instead of each
        # making (and dropping) a client, a connection and a SCRIPT LOAD of their own.
        self._lock = threading.Lock()

    def _get_pool(self):  # made after fork: a worker must not share the master's sockets
        if self._pid != db.pid():
            with self._lock:
                if self._pid != db.pid():
                    import redis

                    client = redis.Redis.from_url(self.uri, socket_timeout=STORE_TIMEOUT_SECONDS,
                                                  socket_connect_timeout=STORE_TIMEOUT_SECONDS)
                    self._sha = client.script_load(_LUA_FIXED)  # before first use: no EVALSHA meets NOSCRIPT
                    self._pool, self._pid = client.connection_pool, db.pid()
        return self._pool

    def _evalsha(self, keys: list[str], args: list[int]) -> list:
        import redis

        pool = self._get_pool()
        conn = pool.get_connection()
        try:
            try:
                conn.send_command("EVALSHA", self._sha, len(keys), *keys, *args)
                return conn.read_response()
            except redis.exceptions.NoScriptError:
                conn.send_command("SCRIPT", "LOAD", _LUA_FIXED)
                conn.read_response()
            except redis.exceptions.ConnectionError:
                # A connection the server closed (a restart): the send below connects again. Not after a timeout,
                # when the script may have run: a second EVALSHA would count the request twice.
                conn.disconnect()
            conn.send_command("EVALSHA", self._sha, len(keys), *keys, *args)  # once more; a second failure raises
            return conn.read_response()
        finally:
            pool.release(conn)

    def hit(self, key: str, limits: list[tuple[int, int]]) -> list[Window]:
        import redis

        keys = [f"gateway:fixed:{key}:{amount}:{seconds}" for amount, seconds in limits]
        try:
            raw = self._evalsha(keys, [seconds * 1000 for _, seconds in limits])
        except redis.RedisError as exc:
            raise _store_down(exc) from None
        now = time.time()
        return [Window(amount, seconds, int(raw[2 * i]), now + int(raw[2 * i + 1]) / 1000)
                for i, (amount, seconds) in enumerate(limits)]


class LibraryCounter(Counter):
    """Any strategy in any store the `limits` library knows: a hit, then a window read, per limit."""

    def __init__(self, uri: str, strategy: str) -> None:
        from limits.storage import storage_from_string
        from limits.strategies import STRATEGIES

        self.limiter = STRATEGIES[strategy](storage_from_string(uri))

    def hit(self, key: str, limits: list[tuple[int, int]]) -> list[Window]:
        from limits import RateLimitItemPerDay, RateLimitItemPerMinute

        out = []
        try:
            for amount, seconds in limits:
                item = (RateLimitItemPerMinute if seconds == MINUTE else RateLimitItemPerDay)(amount)
                ok = self.limiter.hit(item, key)
                reset, remaining = self.limiter.get_window_stats(item, key)
                # A refused hit is not stored by moving windows; count it as one past the amount all the same.
                out.append(Window(amount, seconds, amount + 1 if not ok else amount - remaining, reset))
        except Exception as exc:  # the store's own errors (redis, memcached, ...): no common base class
            raise _store_down(exc) from None
        return out


def _store_down(exc: Exception) -> GatewayError:
    return GatewayError(f"The rate-limit store is unavailable ({type(exc).__name__}); try again shortly.",
                        status=503, type="api_error", code="rate_limit_store_unavailable")


def make_counter(uri: str, strategy: str) -> Counter:
    scheme = uri.partition("://")[0]
    if strategy == "fixed-window" and scheme == "memory":
        return MemoryCounter()
    if strategy == "fixed-window" and scheme in ("redis", "rediss"):
        try:
            import redis  # noqa: F401
        except ImportError:
            raise ConfigError(f"[limits].storage_uri {uri!r} needs the Python package 'redis'.") from None
        return RedisCounter(uri)
    try:
        return LibraryCounter(uri, strategy)
    except Exception as exc:  # a scheme whose driver is not installed, or a malformed address
        raise ConfigError(f"[limits].storage_uri {uri!r} cannot be used ({exc}); "
                          "install its driver or use \"memory://\".") from None


def _limits_of(key) -> list[tuple[int, int]]:
    cfg = current_app.config["GATEWAY"].limits
    rpm = cfg.default_rpm if key.rpm is None else key.rpm
    rpd = cfg.default_rpd if key.rpd is None else key.rpd
    return [(n, per) for n, per in ((rpm, MINUTE), (rpd, DAY)) if n]  # 0 means unlimited


def register(app: Flask) -> Counter:
    """The limiter, after auth.register (its before_request must run after authentication)."""
    cfg = app.config["GATEWAY"]
    counter = make_counter(cfg.limits.storage_uri, cfg.limits.strategy)

    @app.before_request
    def limit() -> None:
        key = g.api_key
        if key is None:  # /health; every other path was refused by authenticate if it had no key
            return
        limits = _limits_of(key)
        if not limits:
            return
        g.rate_windows = windows = counter.hit(f"key:{key.id}", limits)
        breached = next((w for w in windows if w.breached), None)
        if breached is not None:
            raise _refusal(breached)

    @app.after_request
    def headers(resp: Response) -> Response:
        windows = g.get("rate_windows")
        if windows:
            now = time.time()
            h = resp.headers
            for w in windows:
                suffix = "requests" if w.seconds <= MINUTE else "requests-day"
                h[f"x-ratelimit-limit-{suffix}"] = str(w.amount)
                h[f"x-ratelimit-remaining-{suffix}"] = str(w.remaining)
                h[f"x-ratelimit-reset-{suffix}"] = duration(seconds_left(w.reset, now))
        return resp

    app.extensions["gateway_limiter"] = counter
    return counter


def _refusal(w: Window) -> RateLimitError:
    per = "minute" if w.seconds <= MINUTE else "day"
    retry = seconds_left(w.reset, time.time())
    headers = {"Retry-After": str(retry)}
    metrics.LIMITED.labels(per).inc()  # metrics hook
    if per == "day":
        # The official SDKs honour x-should-retry before Retry-After: without it the Node SDK sleeps the
        # rest of the day inside one call, and openai-python gives up only after retrying in vain.
        headers["x-should-retry"] = "false"
        advice = f"The daily budget resets in {duration(retry)}; ask the operator for a higher limit."
    else:
        advice = f"Please try again in {retry}s."
    return RateLimitError(f"Rate limit reached for requests per {per}: limit {w.amount}. {advice}", headers=headers)
