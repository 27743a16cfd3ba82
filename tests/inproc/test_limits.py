"""Per-key rate limits in process: one budget across routes, OpenAI's headers, bad keys spend nothing, the exact
Retry-After, a daily limit the SDK does not retry."""
from __future__ import annotations

import math
import time

import openai
import pytest


def test_rpm_shared_across_routes_with_openai_headers(gateway):
    key_id, secret = gateway.create_key("1", rpm=3)
    for _ in range(5):  # bad keys are refused before the limiter and spend nobody's budget
        assert gateway.http.get(f"{gateway.base_url}/models",
                                headers={"Authorization": "Bearer sk-bad"}).status_code == 401
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
    r = gateway.http.get(f"{gateway.base_url}/models", headers={"Authorization": f"Bearer {secret}"})
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
    first = gateway.http.get(f"{gateway.base_url}/models", headers=auth)
    t1 = time.time()
    assert first.status_code == 200
    reset = first.headers["x-ratelimit-reset-requests"]
    assert reset.endswith("s") and reset != "1m1s" and int(reset.split("m")[-1].rstrip("s")) <= 60
    time.sleep(max(0.0, math.floor(t0) + 2.65 - time.time()))
    t2 = time.time()
    refused = gateway.http.get(f"{gateway.base_url}/models", headers=auth)
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
        assert gateway.http.get(f"{gateway.url}/health", headers={"Authorization": f"Bearer {secret}"}).ok


