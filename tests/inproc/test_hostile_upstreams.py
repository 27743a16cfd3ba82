"""Hostile upstreams in process: an echoed credential never reaches a client or the log, and odd upstream
answers (Retry-After: inf) or client numbers (400 digits) are clean refusals that cost nothing."""
from __future__ import annotations

import json
import re

import openai
import pytest
import requests

from tests.checks import assert_free, sse_error
from tests.conftest import GEMINI_KEY, UPSTREAM_KEY

NANO = 10**9


def assert_clean(text: str) -> None:
    """No credential in any shape the fakes echo it in."""
    lower = text.lower()
    assert UPSTREAM_KEY not in text and GEMINI_KEY not in text
    assert "bearer sk-" not in lower and "key=" not in lower and "x-goog-api-key: " not in lower


def assert_log_clean(log: str) -> None:
    """The log names keys by prefix (key=sk-abcde route=...); no other key= and no credential may appear."""
    assert UPSTREAM_KEY not in log and GEMINI_KEY not in log and "bearer sk-" not in log.lower()
    assert not re.search(r"key=(?!(sk-\S{5}|-) route=)", log, re.IGNORECASE)  # a refused request's key is "-"


def _post(gw, secret: str, path: str, body: dict, **kw) -> requests.Response:
    return gw.http.post(f"{gw.base_url}/{path}", headers={"Authorization": f"Bearer {secret}"}, json=body,
                         timeout=60, **kw)


# The upstream key never reaches a client.

@pytest.mark.parametrize("word, status", [("[echo400]", 400), ("[echo404]", 404), ("[echo429]", 429),
                                          ("[echo500]", 502), ("[echo500-text]", 502)])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_echoed_key_is_scrubbed_from_chat_errors(gateway, word, status, stream):
    key_id, secret = gateway.create_key("1")
    r = _post(gateway, secret, "chat/completions",
              {"model": "gpt-test", "stream": stream, "messages": [{"role": "user", "content": f"hi {word}"}]})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert "Invalid request" in error["message"] and "[redacted]" in error["message"]  # relayed, scrubbed
    assert len(error["message"]) <= 600
    assert_clean(r.text)
    assert_clean(json.dumps(dict(r.headers)))
    if status == 429:
        assert r.headers["Retry-After"] == "3"
    assert_free(gateway, key_id, NANO, status)
    assert_log_clean(gateway.log())


def test_echoed_key_is_scrubbed_from_a_midstream_error_event(gateway):
    key_id, secret = gateway.create_key("1")
    r = _post(gateway, secret, "chat/completions",
              {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi [echo-midstream]"}]})
    assert r.status_code == 200
    error = sse_error(r.text)
    assert error["code"] == "upstream_error" and "[redacted]" in error["message"]
    assert len(error["message"]) <= 600
    assert "tok0" in r.text  # what came before the error was relayed
    assert_clean(r.text)
    # What reached the client before the error is paid for (counted, as no usage report came); nothing more.
    row = gateway.usage(key_id)[-1]
    assert (row["status"], row["estimated"]) == (502, 1) and row["completion_tokens"] > 0
    assert row["cost"] == -(-(row["prompt_tokens"] * 400_000_000 + row["completion_tokens"] * 1_600_000_000)
                            // 10**6)
    assert gateway.balance(key_id) == NANO - row["cost"] and gateway.open_holds(key_id) == 0
    # The SDK sees it as an error too.
    stream = gateway.client(secret).chat.completions.create(
        model="gpt-test", stream=True, messages=[{"role": "user", "content": "hi [echo-midstream]"}])
    with pytest.raises(openai.APIError) as exc:
        for _ in stream:
            pass
    assert_clean(str(exc.value))
    assert_log_clean(gateway.log())


@pytest.mark.parametrize("word, status", [("[echo400]", 400), ("[echo429]", 429), ("[echo500]", 502)])
def test_echoed_key_is_scrubbed_from_legacy_completions_and_openai_images(gateway, word, status):
    key_id, secret = gateway.create_key("1")
    r = _post(gateway, secret, "completions", {"model": "gpt-text", "prompt": f"hi {word}"})
    assert r.status_code == status and "[redacted]" in r.json()["error"]["message"]
    assert_clean(r.text)
    r = _post(gateway, secret, "images/generations", {"model": "gpt-image-1", "prompt": f"a cat {word}"})
    assert r.status_code == status and "[redacted]" in r.json()["error"]["message"]
    assert_clean(r.text)
    assert gateway.balance(key_id) == NANO and gateway.open_holds(key_id) == 0
    assert [row["cost"] for row in gateway.usage(key_id)] == [0, 0]
    assert_log_clean(gateway.log())


_ECHOES = [("[echo400]", 400), ("[echo404]", 404), ("[echo429]", 429), ("[echo500]", 502)]


# Imagen's :predict answers carry no model text, so only generateContent has the no-image echo.
@pytest.mark.parametrize("model, word, status",
                         [(m, w, s) for m in ("gemini-2.5-flash-image", "imagen-4.0-generate-001") for w, s in _ECHOES]
                         + [("gemini-2.5-flash-image", "[echo-noimage]", 502)])
def test_echoed_key_is_scrubbed_from_gemini_image_errors(gateway, model, word, status):
    key_id, secret = gateway.create_key("1")
    r = _post(gateway, secret, "images/generations", {"model": model, "prompt": f"a cat {word}", "n": 2})
    assert r.status_code == status, r.text
    assert "[redacted]" in r.json()["error"]["message"]
    assert_clean(r.text)
    assert_free(gateway, key_id, NANO, status)
    assert_log_clean(gateway.log())


def test_echoed_key_is_scrubbed_from_music_errors_and_warnings(gateway):
    key_id, secret = gateway.create_key("1")
    r = _post(gateway, secret, "audio/music", {"prompt": "rock [echo-close]", "duration_seconds": 4})
    assert r.status_code == 502, r.text
    assert "1011" in r.json()["error"]["message"] and "[redacted]" in r.json()["error"]["message"]
    assert_clean(r.text)
    assert_free(gateway, key_id, NANO, 502)
    r = _post(gateway, secret, "audio/music", {"prompt": "rock [echo-warn]", "duration_seconds": 4})
    assert r.status_code == 200
    log = gateway.log()
    assert "Deprecated auth [redacted]" in log  # the warning was logged, scrubbed
    assert_log_clean(log)


def test_retry_after_inf_is_a_429_without_the_header(gateway):
    key_id, secret = gateway.create_key("1")
    r = _post(gateway, secret, "chat/completions",
              {"model": "gpt-test", "messages": [{"role": "user", "content": "hi [retry-inf]"}]})
    assert r.status_code == 429, r.text  # was a 500
    assert r.json()["error"]["message"] == "Slow down."
    assert "Retry-After" not in r.headers
    assert_free(gateway, key_id, NANO, 429)


def test_a_400_digit_music_number_is_a_400(gateway):
    key_id, secret = gateway.create_key("1")
    huge = "9" * 400
    for body, param in ((f'{{"prompt": "jazz", "duration_seconds": {huge}}}', "duration_seconds"),
                        (f'{{"prompt": "jazz", "music_generation_config": {{"bpm": {huge}}}}}',
                         "music_generation_config.bpm")):
        r = gateway.http.post(f"{gateway.base_url}/audio/music", data=body, timeout=30,
                          headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})
        assert r.status_code == 400, r.text  # was a 500 (OverflowError)
        assert r.json()["error"]["param"] == param
    assert gateway.balance(key_id) == NANO and gateway.open_holds(key_id) == 0



