"""Per-key rate limits: one budget across routes, OpenAI's headers, bad keys spend nothing, Redis across workers."""
from __future__ import annotations

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
    assert 1 <= int(err.response.headers["retry-after"]) <= 61  # limits reports whole-second resets
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
