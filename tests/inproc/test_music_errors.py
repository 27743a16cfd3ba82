"""POST /v1/audio/music refusals in process (Flask's test client, the fake Lyria server): 400s, 402s, 404s and
upstream failures, all free and never carrying the upstream key."""
from __future__ import annotations

import time

import pytest
import requests

from tests.checks import music_error as error
from tests.conftest import GEMINI_KEY

PRICE_NANO = 1_000_000  # lyria-realtime-exp: per_second 0.001 credits in the test config
def post(gw, secret: str, body: dict, timeout: float = 30) -> requests.Response:
    """A music request; whatever the gateway answers must never carry the upstream key."""
    resp = gw.http.post(f"{gw.base_url}/audio/music", json=body, timeout=timeout,
                         headers={"Authorization": f"Bearer {secret}"})
    assert GEMINI_KEY not in resp.text and GEMINI_KEY not in str(resp.headers)
    return resp


@pytest.mark.parametrize("body, status, code, words", [
    ({"prompt": "noise [filter]"}, 400, "content_policy_violation", "filtered for safety"),
    ({"prompt": "rock [close1011]"}, 502, "upstream_error", "1011"),
    # The two the fake never completes run on the lyria-short upstream, whose idle timeout is 0.5 s instead of 3.
    ({"prompt": "ambient [stall]", "model": "lyria-short"}, 504, "upstream_timeout", "in time"),
    ({"prompt": "ambient", "model": "lyria-nosetup"}, 504, "upstream_timeout", "setup"),
], ids=["filter", "close1011", "stall", "nosetup"])
def test_upstream_failures_map_and_cost_nothing(gateway, key, body, status, code, words):
    key_id, secret = key
    before = gateway.balance(key_id)
    start = time.monotonic()
    err = error(post(gateway, secret, {**body, "duration_seconds": 4}), status, code)
    assert words in err["message"]
    # The idle timeout (3 s, or 0.5 s on lyria-short) ends it, not the 13 s (10.5 s) deadline of a 4 s clip.
    assert time.monotonic() - start < 8
    assert gateway.balance(key_id) == before and gateway.open_holds(key_id) == 0
    (row,) = gateway.usage(key_id)
    assert (row["status"], row["cost"]) == (status, 0)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "weighted_prompts": [{"text": "b", "weight": 1}]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"weighted_prompts": []}, "weighted_prompts"),
    ({"weighted_prompts": [{"text": "a", "weight": 0}]}, "weighted_prompts[0].weight"),
    ({"prompt": [{"text": "a"}, {"text": "b", "weight": 0}]}, "prompt[1].weight"),
    ({"prompt": "a", "music_generation_config": {"bpm": 300}}, "music_generation_config.bpm"),
    ({"prompt": "a", "music_generation_config": {"scale": "C"}}, "music_generation_config.scale"),
    ({"prompt": "a", "duration_seconds": "x"}, "duration_seconds"),
    ({"prompt": "a", "response_format": "mp3"}, "response_format"),
    ({"prompt": "a", "model": 7}, "model"),
    ({"prompt": "a", "model": "gpt-test"}, "model"),
])
def test_bad_fields_are_400_naming_the_field(gateway, key, body, param):
    key_id, secret = key
    error(post(gateway, secret, body), 400, param=param)
    assert gateway.balance(key_id) == 10 * 10**9 and gateway.usage(key_id) == []


def test_unknown_model_is_404(gateway, key):
    error(post(gateway, key[1], {"prompt": "a", "model": "lyria-nope"}), 404, "model_not_found")


def test_cannot_afford_is_402_before_any_upstream_call(gateway, fake_lyria):
    key_id, secret = gateway.create_key("0.001")
    sessions = len(fake_lyria.sessions)
    err = error(post(gateway, secret, {"prompt": "a", "duration_seconds": 8}), 402, "insufficient_credits")
    assert "0.008" in err["message"]
    assert gateway.balance(key_id) == PRICE_NANO and gateway.usage(key_id) == []
    assert len(fake_lyria.sessions) == sessions


def test_missing_upstream_key_is_502_naming_the_variable(make_gateway, fake_lyria):
    def no_key(cfg: dict) -> None:
        cfg["upstreams"]["lyria"]["api_key_env"] = "TEST_MISSING_KEY"
    gw = make_gateway(no_key)
    key_id, secret = gw.create_key("10")
    sessions = len(fake_lyria.sessions)
    err = error(post(gw, secret, {"prompt": "a", "duration_seconds": 4}), 502, "upstream_error")
    assert "TEST_MISSING_KEY" in err["message"]
    assert gw.balance(key_id) == 10 * 10**9 and gw.usage(key_id) == []
    assert len(fake_lyria.sessions) == sessions  # no session opened without a key
