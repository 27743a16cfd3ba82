"""Per-key rate limits: one budget across routes, OpenAI's headers, bad keys spend nothing, Redis across workers."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from tests.conftest import free_port


def test_rpm_shared_across_routes_with_openai_headers(gateway):
    key_id, secret = gateway.create_key("1", rpm=3)
    for _ in range(5):  # bad keys are refused before the limiter and spend nobody's budget
        assert requests.get(f"{gateway.base_url}/models", headers={"Authorization": "Bearer sk-bad"}).status_code == 401
    client = gateway.client(secret)
    first = client.models.with_raw_response.list()
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    client.completions.create(model="gpt-test", prompt="x")
    with pytest.raises(openai.RateLimitError) as exc:
        client.models.list()
    err = exc.value
    assert err.code == "rate_limit_exceeded" and err.type == "rate_limit_error"
    assert 1 <= int(err.response.headers["retry-after"]) <= 60  # never past the 60-second window
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert "per minute" in err.message


def test_rpd(gateway):
    _, secret = gateway.create_key("1", rpm=100, rpd=2)
    client = gateway.client(secret)
    client.models.list()
    r = client.models.with_raw_response.list()
    assert r.headers["x-ratelimit-limit-requests-day"] == "2"
    with pytest.raises(openai.RateLimitError) as exc:
        client.models.list()
    assert "per day" in exc.value.message
    headers = exc.value.response.headers
    assert headers["x-should-retry"] == "false"  # both official SDKs stop here instead of sleeping for a day
    assert 1 <= int(headers["retry-after"]) <= 86400
    assert "ask the operator" in exc.value.message


def test_rpd_429_is_not_retried_by_the_sdk(gateway):
    _, secret = gateway.create_key("1", rpd=1)
    gateway.client(secret).models.list()
    retrying = gateway.client(secret, max_retries=3)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        retrying.models.list()
    assert time.monotonic() - started < 30  # one answer, not three waits of a day (or of 60 s capped)
    r = requests.get(f"{gateway.base_url}/models", headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 429 and r.headers["x-should-retry"] == "false"


def _window_bounds(first_sent: float, first_done: float, refused_sent: float, refused_done: float) -> range:
    """The whole seconds a 60-second window that opened during the first request can have left when the
    refused one was answered: ceil of (opening + 60 - answer time), over the extremes of both."""
    low = math.ceil(first_sent + 60 - refused_done)
    high = math.ceil(first_done + 60 - refused_sent)
    return range(max(1, low), min(60, high) + 1)


def test_retry_after_is_the_exact_seconds_left(gateway):
    _, secret = gateway.create_key("1", rpm=1)
    auth = {"Authorization": f"Bearer {secret}"}
    # The window opens at about x.3 s and the refusal comes at about (x+2).65 s: 57.65 s left, so exact is 58,
    # and the old answer, from a reset time already rounded up to x+61, was 59 (61 at the window's start).
    time.sleep((0.3 - time.time() % 1) % 1)
    t0 = time.time()
    first = requests.get(f"{gateway.base_url}/models", headers=auth)
    t1 = time.time()
    assert first.status_code == 200
    reset = first.headers["x-ratelimit-reset-requests"]
    assert reset.endswith("s") and reset != "1m1s" and int(reset.split("m")[-1].rstrip("s")) <= 60
    time.sleep(max(0.0, math.floor(t0) + 2.65 - time.time()))
    t2 = time.time()
    refused = requests.get(f"{gateway.base_url}/models", headers=auth)
    t3 = time.time()
    assert refused.status_code == 429
    retry = int(refused.headers["retry-after"])
    assert retry <= 60
    assert retry in _window_bounds(t0, t1, t2, t3), (retry, t0, t1, t2, t3)
    assert refused.headers["x-ratelimit-reset-requests"] in {f"{retry}s", "1m0s" if retry == 60 else ""}
    assert "x-should-retry" not in refused.headers  # a per-minute limit is worth waiting for


def test_health_is_not_limited(gateway):
    _, secret = gateway.create_key("1", rpm=1)
    for _ in range(5):
        assert requests.get(f"{gateway.url}/health", headers={"Authorization": f"Bearer {secret}"}).ok


@pytest.fixture
def redis_url():
    server = shutil.which("redis-server")
    if not server:
        # CI installs it (.ci/run), so there its absence is a broken CI, not a reason to skip.
        if os.environ.get("CI"):
            pytest.fail("redis-server is not on the PATH, but CI is set and .ci/run should have installed it")
        pytest.skip("redis-server not on the PATH (apt-get install redis-server); CI runs this test")
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    import socket
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


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
    assert stats["cmdstat_incr"]["calls"] == 80  # inside the script: one per window per request
    assert int(store.ttl("gateway:fixed:key:1:10:60")) in range(1, 61)
