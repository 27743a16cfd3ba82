"""Per-key rate limits across gunicorn workers: Redis keeps them exact (the single-process limits are in
tests/inproc/test_limits.py)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.redis_server import RedisServer


@pytest.fixture
def redis_url():
    server = RedisServer()
    server.start()
    yield server.url
    server.stop()


def test_redis_limits_are_exact_across_workers(make_gateway, redis_url):
    def change(cfg):
        cfg["limits"]["storage_uri"] = redis_url
        cfg["limits"]["strategy"] = "moving-window"
    gw = make_gateway(change, workers=2)
    _, secret = gw.create_key("1", rpm=10)

    def one(_):  # a new connection each time, so both workers serve requests
        with requests.Session() as s:
            return s.get(f"{gw.base_url}/models", headers={"Authorization": f"Bearer {secret}"}).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(40)))
    assert statuses.count(200) == 10
    assert statuses.count(429) == 30


def test_redis_fixed_window_one_round_trip_exact_across_workers(make_gateway, redis_url):
    """The shipped strategy in Redis: each limited request is ONE EVALSHA (counting and reading both windows),
    and the counts, remaining headers and 429s stay exact with two workers sharing the store."""
    import redis

    def change(cfg):
        cfg["limits"]["storage_uri"] = redis_url
        cfg["limits"]["strategy"] = "fixed-window"
    gw = make_gateway(change, workers=2)
    _, secret = gw.create_key("1", rpm=10, rpd=1000)
    store = redis.Redis.from_url(redis_url)
    store.config_resetstat()

    def one(_):  # a new connection each time, so both workers serve requests
        with requests.Session() as s:
            r = s.get(f"{gw.base_url}/models", headers={"Authorization": f"Bearer {secret}"})
            return r.status_code, r.headers

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(40)))
    statuses = [status for status, _ in answers]
    assert statuses.count(200) == 10 and statuses.count(429) == 30
    # Every request counted once in each window: the ten accepted ones saw each remaining value exactly once.
    remaining = sorted(int(h["x-ratelimit-remaining-requests"]) for status, h in answers if status == 200)
    assert remaining == list(range(10))
    day_left = sorted(int(h["x-ratelimit-remaining-requests-day"]) for _, h in answers)
    assert day_left == list(range(960, 1000))  # refused requests count too, as the library's fixed window does
    for status, h in answers:
        if status == 429:
            assert h["x-ratelimit-remaining-requests"] == "0"
            assert 1 <= int(h["retry-after"]) <= 60
            assert h["x-ratelimit-reset-requests"] in {f"{h['retry-after']}s", "1m0s"}
    stats = store.info("commandstats")
    evalsha = stats["cmdstat_evalsha"]
    # One round trip per request, for both windows; the script was loaded before first use, so none failed.
    assert evalsha["calls"] == 40 and evalsha.get("failed_calls", 0) == 0, evalsha
    # Nothing else went to Redis per request: commands a script runs are counted apart, and the rest is the
    # handshake of each pooled connection (at most one per request in flight per worker) and this test's own.
    handshake = ("cmdstat_hello", "cmdstat_client|setinfo", "cmdstat_config|resetstat", "cmdstat_script|load")
    inside = ("cmdstat_evalsha", "cmdstat_incr", "cmdstat_pttl", "cmdstat_pexpire")
    direct = {name: s["calls"] for name, s in stats.items() if name not in handshake + inside}
    assert direct == {}, direct
    assert sum(stats.get(name, {}).get("calls", 0) for name in handshake) <= 2 * 8 * 2 + 3
    # One client and one SCRIPT LOAD per worker, however many greenlets arrive at its start together.
    assert stats.get("cmdstat_script|load", {}).get("calls", 0) <= 2
    assert stats["cmdstat_incr"]["calls"] == 80  # inside the script: one per window per request
    assert int(store.ttl("gateway:fixed:key:1:10:60")) in range(1, 61)
