"""POST /v1/images/generations refusals in process (Flask's test client against the fake Gemini and OpenAI
upstreams, the official SDK over WSGI): 400s, 402s, 404s, content policy, 429s and upstream failures, all free."""
from __future__ import annotations

import uuid

import openai
import pytest
import requests

from tests.checks import gemini_calls, images
from tests.checks import image_error as error
from tests.conftest import GEMINI_KEY, UPSTREAM_KEY
from tests.fake_gemini import RAI_REASON

FLASH = 39_000_000    # gemini-2.5-flash-image: per_image 0.039 credits, in nano-credits
TEN = 10_000_000_000  # the `key` fixture's opening balance
def tag() -> str:
    """A unique word, so a test finds its own calls among those the shared fakes recorded."""
    return uuid.uuid4().hex[:12]


def post(gw, secret: str, body: dict, timeout: float = 30) -> requests.Response:
    """A raw request; whatever the gateway answers must never carry an upstream key."""
    resp = gw.http.post(f"{gw.base_url}/images/generations", json=body, timeout=timeout,
                         headers={"Authorization": f"Bearer {secret}"})
    for secret_key in (GEMINI_KEY, UPSTREAM_KEY):
        assert secret_key not in resp.text and secret_key not in str(resp.headers)
    return resp


def one_row(gw, key_id: int) -> dict:
    (row,) = gw.usage(key_id)
    return dict(row)


# Success: Gemini image models, Imagen, OpenAI image models

# Bad requests: 400 naming the field, before any credit moves or any upstream call

@pytest.mark.parametrize("body, param, code", [
    ({"prompt": "x", "size": "big"}, "size", "invalid_size"),
    ({"prompt": "x", "size": "1024X1024"}, "size", "invalid_size"),
    ({"prompt": "x", "size": "0x1024"}, "size", "invalid_size"),
    ({"prompt": "x", "size": 1024}, "size", "invalid_size"),
    ({"prompt": "x", "model": "imagen-4.0-generate-001", "size": "1024x"}, "size", "invalid_size"),
    ({"prompt": "x", "model": "gpt-image-1", "size": "huge"}, "size", "invalid_size"),
    ({"prompt": "x", "n": 0}, "n", "invalid_value"),
    ({"prompt": "x", "n": 11}, "n", "invalid_value"),
    ({"prompt": "x", "n": "2"}, "n", "invalid_value"),
    ({"prompt": "x", "n": True}, "n", "invalid_value"),
    ({"prompt": "x", "n": 2.0}, "n", "invalid_value"),
    ({"prompt": "x", "model": "gpt-image-1", "n": 11}, "n", "invalid_value"),
    ({"prompt": ""}, "prompt", "invalid_value"),
    ({"prompt": "   "}, "prompt", "invalid_value"),
    ({"prompt": ["a", "cat"]}, "prompt", "invalid_value"),
    ({}, "prompt", "missing_required_parameter"),
    ({"model": "gemini-2.5-flash-image"}, "prompt", "missing_required_parameter"),
    ({"prompt": "x", "response_format": "png"}, "response_format", "invalid_value"),
    ({"prompt": "x", "stream": True}, "stream", "unsupported_value"),
    ({"prompt": "x", "model": 5}, "model", "invalid_type"),
    ({"prompt": "x", "model": ""}, "model", "invalid_type"),
    ({"prompt": "x", "model": "gpt-test"}, "model", "model_not_supported"),
    ({"prompt": "x", "model": "lyria-realtime-exp"}, "model", "model_not_supported"),
])
def test_bad_requests_are_400_and_cost_nothing(gateway, key, fake_gemini, fake_openai, body, param, code):
    key_id, secret = key
    seen = len(fake_gemini.requests), len(fake_openai.requests)
    err = error(post(gateway, secret, body), 400, code, param)
    assert err["type"] == "invalid_request_error"
    assert param in err["message"]
    assert (len(fake_gemini.requests), len(fake_openai.requests)) == seen
    assert gateway.balance(key_id) == TEN
    assert gateway.usage(key_id) == []


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 11}, {"size": "big"}, {"prompt": ""}])
def test_bad_requests_raise_bad_request_in_the_sdk(gateway, key, kwargs):
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client(key[1]).images.generate(**{"prompt": "x", **kwargs})
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == next(iter(kwargs))


def test_unknown_model_is_404(gateway, key):
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.client(key[1]).images.generate(model="dall-e-9", prompt="x")
    assert caught.value.body["code"] == "model_not_found"
    err = error(post(gateway, key[1], {"model": "dall-e-9", "prompt": "x"}), 404, "model_not_found", "model")
    assert err["message"] == "The model `dall-e-9` does not exist or you do not have access to it."
    assert gateway.balance(key[0]) == TEN


def test_a_key_that_cannot_afford_n_images_gets_402(gateway, fake_gemini):
    key_id, secret = gateway.create_key("0.05")
    word = tag()
    err = error(post(gateway, secret, {"prompt": word, "n": 2}), 402, "insufficient_credits")
    assert err["type"] == "insufficient_quota"
    assert err["message"] == ("This key has 0.05 credits; 2 image(s) from gemini-2.5-flash-image need 0.078. "
                              "Top up the key or ask for fewer images (n).")
    assert gemini_calls(fake_gemini, word) == []
    assert gateway.balance(key_id) == 50_000_000
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client(secret).images.generate(prompt=word, n=2)
    assert caught.value.status_code == 402
    images(post(gateway, secret, {"prompt": word}), 1)  # one image is affordable
    assert gateway.balance(key_id) == 50_000_000 - FLASH


# Upstream failures: OpenAI-shaped, and free when no image came back

@pytest.mark.parametrize("prompt, reason", [
    ("[safety] a scene", "(IMAGE_SAFETY)"),
    ("[blocked] a scene", "(SAFETY)"),
])
def test_gemini_safety_block_is_content_policy_violation(gateway, key, prompt, reason):
    key_id, secret = key
    err = error(post(gateway, secret, {"prompt": prompt, "n": 2}), 400, "content_policy_violation", "prompt")
    assert err["message"] == f"The image request was blocked by the upstream's safety filter {reason}."
    assert gateway.balance(key_id) == TEN
    row = one_row(gateway, key_id)
    assert (row["cost"], row["status"], row["units"]) == (0, 400, 0)


def test_imagen_safety_block_carries_googles_reason(gateway, key):
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client(key[1]).images.generate(model="imagen-4.0-generate-001", prompt="[safety] x", n=2)
    assert caught.value.code == "content_policy_violation"
    assert caught.value.body["message"] == ("The image request was blocked by the upstream's safety filter ("
                                            + RAI_REASON.rstrip(".") + ").")
    assert gateway.balance(key[0]) == TEN


def test_google_429_is_429_with_retry_after_from_retry_info(gateway, key):
    key_id, secret = key
    resp = post(gateway, secret, {"prompt": "[429] x"})
    err = error(resp, 429, "rate_limit_exceeded")
    assert resp.headers["Retry-After"] == "7"
    assert "You exceeded your current quota" in err["message"]
    with pytest.raises(openai.RateLimitError):
        gateway.client(secret).images.generate(prompt="[429] x")
    assert gateway.balance(key_id) == TEN


@pytest.mark.parametrize("prompt, status, code, text", [
    ("[503] x", 502, "upstream_error", "failed with HTTP 503: The model is overloaded. Please try again later."),
    ("[garbage] x", 502, "upstream_error", "a body that is not JSON"),
    ("[noimage] x", 502, "upstream_error", "The upstream returned no image (finishReason NO_IMAGE)"),
])
def test_upstream_failures_are_5xx_and_free(gateway, key, prompt, status, code, text):
    key_id, secret = key
    err = error(post(gateway, secret, {"prompt": prompt, "n": 2}), status, code)
    assert err["type"] == "api_error"
    assert text in err["message"]
    assert gateway.balance(key_id) == TEN
    assert one_row(gateway, key_id)["status"] == status


# The upstream key: missing and refused (an app of its own config; was a gunicorn start-up in tests/e2e)

def test_missing_and_refused_upstream_keys_are_502_and_never_leak(make_gateway, fake_gemini):
    wrong = "AIzaSy-wrong-key-0123456789"

    def change(cfg: dict) -> None:
        cfg["upstreams"]["gemini-nokey"] = {**cfg["upstreams"]["gemini"], "api_key_env": "TEST_MISSING_KEY"}
        cfg["upstreams"]["gemini-wrongkey"] = {**cfg["upstreams"]["gemini"], "api_key_env": "TEST_WRONG_KEY"}
        cfg["models"]["img-nokey"] = {**cfg["models"]["gemini-2.5-flash-image"], "upstream": "gemini-nokey",
                                      "upstream_model": "gemini-2.5-flash-image"}
        cfg["models"]["img-wrongkey"] = {**cfg["models"]["gemini-2.5-flash-image"], "upstream": "gemini-wrongkey",
                                         "upstream_model": "gemini-2.5-flash-image"}
    gw = make_gateway(change, env={"TEST_WRONG_KEY": wrong})
    key_id, secret = gw.create_key("10")
    word = tag()
    err = error(post(gw, secret, {"model": "img-nokey", "prompt": word}), 502, "upstream_error")
    assert "TEST_MISSING_KEY" in err["message"]
    assert gemini_calls(fake_gemini, word) == []
    assert gw.usage(key_id) == []  # refused before the hold
    resp = post(gw, secret, {"model": "img-wrongkey", "prompt": word, "n": 2})
    err = error(resp, 502, "upstream_error")
    assert err["message"] == ("The upstream 'gemini-wrongkey' refused the gateway's own API key (HTTP 400 "
                              "API_KEY_INVALID); the operator must check TEST_WRONG_KEY.")
    assert wrong not in resp.text
    assert len(gemini_calls(fake_gemini, word)) == 2
    assert gw.balance(key_id) == TEN
    assert wrong not in gw.log() and GEMINI_KEY not in gw.log()
