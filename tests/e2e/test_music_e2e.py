"""POST /v1/audio/music end to end: the real gunicorn + gevent gateway, the fake Lyria server, `requests` as a user."""
from __future__ import annotations

import io
import time
import uuid
import wave
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
import requests

from tests.checks import audio
from tests.checks import music_error as error
from tests.conftest import GEMINI_KEY

PRICE_NANO = 1_000_000  # lyria-realtime-exp: per_second 0.001 credits in the test config
PCM_MIME = "audio/l16;rate=48000;channels=2"


def post(gw, secret: str, body: dict, timeout: float = 30) -> requests.Response:
    """A music request; whatever the gateway answers must never carry the upstream key."""
    resp = requests.post(f"{gw.base_url}/audio/music", json=body, timeout=timeout,
                         headers={"Authorization": f"Bearer {secret}"})
    assert GEMINI_KEY not in resp.text and GEMINI_KEY not in str(resp.headers)
    return resp


def tag() -> str:
    """A unique word to find this request's session at the fake."""
    return uuid.uuid4().hex[:12]


def session_for(fake, word: str) -> dict:
    """The fake's record of the session whose prompts mention `word`."""
    for session in reversed(fake.sessions):
        for msg in session["messages"]:
            prompts = (msg.get("clientContent") or {}).get("weightedPrompts") or []
            if any(word in p.get("text", "") for p in prompts):
                return session
    raise AssertionError(f"no Lyria session with prompt {word!r}")


@pytest.mark.parametrize("asked, seconds", [(4, 4), (8, 8), (30, 30), (2, 4), (60, 30), (4.5, 4.5)])
def test_clip_length_duration_and_exact_charge(gateway, key, asked, seconds):
    key_id, secret = key
    before = gateway.balance(key_id)
    resp = post(gateway, secret, {"model": "lyria-realtime-exp", "prompt": "minimal techno",
                                  "duration_seconds": asked})
    doc, pcm = audio(resp)
    assert len(pcm) == int(seconds * 48000) * 4
    assert pcm != bytes(len(pcm))  # the fake's sine, not silence
    assert doc["duration_seconds"] == seconds and isinstance(doc["created"], int)
    assert doc["model"] == "lyria-realtime-exp"
    assert doc["data"][0] | {"b64_audio": ""} == {"b64_audio": "", "mime_type": PCM_MIME, "sample_rate": 48000,
                                                  "channels": 2}
    cost = int(seconds * 1000) * PRICE_NANO // 1000  # exact: seconds x 0.001 credits
    assert before - gateway.balance(key_id) == cost
    assert resp.headers["x-credits-charged"] == str((Decimal(str(seconds)) * Decimal("0.001")).normalize())
    (row,) = gateway.usage(key_id)
    assert (row["route"], row["model"], row["status"], row["cost"], row["units"]) == \
        ("audio.music", "lyria-realtime-exp", 200, cost, seconds)
    assert gateway.open_holds(key_id) == 0


def test_defaults_are_documented_model_and_eight_seconds(gateway, key):
    doc, pcm = audio(post(gateway, key[1], {"prompt": "lofi beats"}))
    assert doc["model"] == "lyria-realtime-exp" and doc["duration_seconds"] == 8
    assert len(pcm) == 8 * 48000 * 4


def test_fake_saw_setup_key_weighted_prompts_and_camel_config(gateway, key, fake_lyria):
    word = tag()
    prompts = [{"text": f"piano {word}", "weight": 1.0}, {"text": "rain", "weight": 0.4}]
    config = {"bpm": 95, "temperature": 1.2, "scale": "D_MAJOR_B_MINOR", "top_k": 30, "mute_drums": True}
    audio(post(gateway, key[1], {"weighted_prompts": prompts, "duration_seconds": 4,
                                 "music_generation_config": config}))
    session = session_for(fake_lyria, word)
    assert session["headers"]["x-goog-api-key"] == GEMINI_KEY and GEMINI_KEY not in session["path"]
    assert session["messages"][:4] == [
        {"setup": {"model": "models/lyria-realtime-exp"}},
        {"clientContent": {"weightedPrompts": prompts}},
        {"musicGenerationConfig": {"bpm": 95, "temperature": 1.2, "scale": "D_MAJOR_B_MINOR", "topK": 30,
                                   "muteDrums": True}},
        {"playbackControl": "PLAY"}]


def test_prompt_given_as_weighted_list(gateway, key, fake_lyria):
    word = tag()
    prompts = [{"text": f"cello {word}", "weight": 2}, {"text": "drums", "weight": -0.5}]
    audio(post(gateway, key[1], {"prompt": prompts, "duration_seconds": 4}))
    assert session_for(fake_lyria, word)["messages"][1] == {"clientContent": {"weightedPrompts": [
        {"text": f"cello {word}", "weight": 2.0}, {"text": "drums", "weight": -0.5}]}}


def test_wav_parses(gateway, key):
    key_id, secret = key
    before = gateway.balance(key_id)
    doc, data = audio(post(gateway, secret, {"prompt": "jazz trio", "duration_seconds": 5,
                                             "response_format": "wav"}))
    assert doc["data"][0]["mime_type"] == "audio/wav" and data[:4] == b"RIFF"
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getframerate(), w.getsampwidth(), w.getnframes()) == (2, 48000, 2, 5 * 48000)
        assert len(w.readframes(w.getnframes())) == 5 * 48000 * 4
    assert before - gateway.balance(key_id) == 5 * PRICE_NANO


def test_ten_concurrent_clips_take_about_as_long_as_one(gateway, key):
    key_id, secret = key
    body = {"prompt": "drum and bass", "duration_seconds": 4}
    audio(post(gateway, secret, body))  # warm up
    start = time.monotonic()
    audio(post(gateway, secret, body))
    single = time.monotonic() - start
    before = gateway.balance(key_id)
    health: list[float] = []
    with ThreadPoolExecutor(10) as pool:
        start = time.monotonic()
        futures = [pool.submit(post, gateway, secret, body) for _ in range(10)]
        while not all(f.done() for f in futures):
            t = time.monotonic()
            assert requests.get(f"{gateway.url}/health", timeout=5).status_code == 200
            health.append(time.monotonic() - t)
            time.sleep(0.02)
        results = [audio(f.result())[1] for f in futures]
        together = time.monotonic() - start
    assert all(len(pcm) == 4 * 48000 * 4 for pcm in results)
    print(f"single {single:.2f}s, ten together {together:.2f}s, slowest /health {max(health) * 1000:.0f} ms")
    assert together < 3 * single, (together, single)
    assert health and max(health) < 0.5, health
    assert before - gateway.balance(key_id) == 10 * 4 * PRICE_NANO


def test_upstream_key_never_in_gateway_log(gateway, key):
    error(post(gateway, key[1], {"prompt": "x [close1011]", "duration_seconds": 4}), 502)
    log = gateway.log()
    assert "route=audio.music" in log and GEMINI_KEY not in log
