"""Chat and completions refusals in process (Flask's test client, the official SDK over WSGI): 400s, 401s, 402s,
404s and upstream error mappings, each with its balance and usage row."""
from __future__ import annotations

import openai
import pytest

from tests.conformance.validate import validate

NANO = 10**9


def test_health_needs_no_key(gateway):
    r = gateway.http.get(f"{gateway.url}/health")
    assert r.status_code == 200
    assert r.json()["status"] == "OK"
    assert r.json()["timestamp"].endswith("Z")
    assert r.headers["x-request-id"].startswith("req_")


def test_bad_key_is_401(gateway):
    for header in ({}, {"Authorization": "Bearer sk-nope"}, {"Authorization": "Basic abc"}):
        r = gateway.http.post(f"{gateway.base_url}/chat/completions", headers=header, json={})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert validate("ErrorResponse", r.json()) == []
    with pytest.raises(openai.AuthenticationError):
        gateway.client("sk-wrong").models.list()


def test_empty_key_is_402_and_costs_nothing(gateway, fake_openai):
    key_id, secret = gateway.create_key("0")
    sent = len(fake_openai.requests)
    with pytest.raises(openai.APIStatusError) as exc:
        gateway.client(secret).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 402
    assert exc.value.code == "insufficient_credits"
    assert len(fake_openai.requests) == sent


def test_client_cap_beyond_balance_is_402(gateway):
    key_id, secret = gateway.create_key("0.0001")
    with pytest.raises(openai.APIStatusError) as exc:
        gateway.client(secret).chat.completions.create(model="gpt-test", max_tokens=1000,
                                                       messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 402
    assert gateway.balance(key_id) == 100_000


def test_unknown_model_is_404(gateway, key):
    with pytest.raises(openai.NotFoundError) as exc:
        gateway.client(key[1]).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert exc.value.code == "model_not_found"


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "gpt-test"}, "messages"),
    ({"model": "gpt-test", "messages": []}, "messages"),
    ({"model": "gpt-test", "messages": "hi"}, "messages"),
    ({"model": "gpt-test", "messages": [{"content": "x"}]}, "messages[0]"),
    ({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"model": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
])
def test_invalid_requests_are_400(gateway, key, body, param):
    r = gateway.http.post(f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {key[1]}"},
                      json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("word,status,cls,model", [
    ("[error400]", 400, openai.BadRequestError, "gpt-test"),
    ("[error401]", 502, openai.InternalServerError, "gpt-test"),
    ("[error429]", 429, openai.RateLimitError, "gpt-test"),
    ("[error500]", 502, openai.InternalServerError, "gpt-test"),
    ("[badjson]", 502, openai.InternalServerError, "gpt-test"),
    # The fake never answers, so only the read timeout ends the call: gpt-short's upstream waits 0.5 s for it.
    ("[hang]", 504, openai.InternalServerError, "gpt-short"),
])
def test_upstream_errors_map_and_cost_nothing(gateway, word, status, cls, model):
    key_id, secret = gateway.create_key("1")
    with pytest.raises(cls) as exc:
        gateway.client(secret).chat.completions.create(model=model,
                                                       messages=[{"role": "user", "content": word}])
    assert exc.value.status_code == status
    if status == 429:
        assert exc.value.response.headers["retry-after"] == "7"
    if word == "[error401]":
        assert "credentials" in exc.value.message  # the gateway's upstream key is wrong, not the client's
    assert gateway.balance(key_id) == NANO
    assert gateway.usage(key_id)[0]["status"] == status and gateway.usage(key_id)[0]["cost"] == 0


def test_missing_upstream_key_and_unreachable_upstream(gateway, key):
    client = gateway.client(key[1])
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="gpt-nokey", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 502 and "TEST_MISSING_KEY" in exc.value.message
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="gpt-dead", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 502


