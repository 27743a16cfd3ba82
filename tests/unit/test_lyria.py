"""providers/lyria.py: request validation and WAV packaging, then real sessions against tests/fake_lyria.py."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import wave
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import validation
from config import UpstreamConfig
from errors import BadRequestError, ContentPolicyError, UpstreamError, UpstreamTimeoutError
from providers import lyria
from providers.base import MusicResult
from routes.music import wav_bytes
from tests.fake_lyria import FakeLyria

ROOT = Path(__file__).resolve().parents[2]
KEY = "lyria-secret-key-123"
ENV = "LYRIA_TEST_KEY"
PIANO = [{"text": "solo piano", "weight": 1.0}]


def bad(call, *args) -> BadRequestError:
    """The BadRequestError a call raises."""
    with pytest.raises(BadRequestError) as info:
        call(*args)
    return info.value


# Pure parts

def test_prompt_string_and_lists():
    assert validation.music_prompts({"prompt": "lofi"}) == [{"text": "lofi", "weight": 1.0}]
    assert validation.music_prompts({"prompt": [{"text": "a", "weight": 2}]}) == [{"text": "a", "weight": 2.0}]
    got = validation.music_prompts({"weighted_prompts": [{"text": "techno", "weight": 1}, {"text": "piano"},
                                                     {"text": "drums", "weight": -0.5}]})
    assert got == [{"text": "techno", "weight": 1.0}, {"text": "piano", "weight": 1.0},
                   {"text": "drums", "weight": -0.5}]


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": "a", "weighted_prompts": [{"text": "b"}]}, "prompt"),
    ({"prompt": "  "}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"weighted_prompts": []}, "weighted_prompts"),
    ({"weighted_prompts": "x"}, "weighted_prompts"),
    ({"weighted_prompts": ["x"]}, "weighted_prompts[0]"),
    ({"weighted_prompts": [{"text": ""}]}, "weighted_prompts[0].text"),
    ({"weighted_prompts": [{"text": "a"}, {"text": "b", "weight": 0}]}, "weighted_prompts[1].weight"),
    ({"weighted_prompts": [{"text": "a"}, {"text": "b", "weight": True}]}, "weighted_prompts[1].weight"),
    ({"weighted_prompts": [{"text": "a", "weight": "1"}]}, "weighted_prompts[0].weight"),
    ({"weighted_prompts": [{"text": "a", "weight": float("nan")}]}, "weighted_prompts[0].weight"),
    ({"weighted_prompts": [{"text": "a", "colour": 1}]}, "weighted_prompts[0].colour"),
])
def test_prompt_errors_name_the_field(body, param):
    err = bad(validation.music_prompts, body)
    assert err.param == param and err.status == 400 and err.message.endswith(".")


def test_duration_clamps_and_defaults():
    assert validation.music_seconds(2, 8.0) == 4
    assert validation.music_seconds(60, 8.0) == 30
    assert validation.music_seconds(8, 8.0) == 8
    assert validation.music_seconds(4.5, 8.0) == 4.5
    assert validation.music_seconds(None, 8.0) == 8.0
    for value in ("x", True, float("inf"), [5]):
        assert bad(validation.music_seconds, value, 8.0).param == "duration_seconds"


def test_pcm_bytes_are_whole_frames():
    assert lyria.pcm_bytes(4) == 4 * 48000 * 4
    assert lyria.pcm_bytes(4.01) == 192480 * 4
    assert lyria.pcm_bytes(4.00001) % 4 == 0


def test_config_snake_and_camel_become_camel():
    got = validation.music_config({"temperature": 1, "top_k": 40, "seed": 7, "guidance": 4.0, "bpm": 120.0,
                              "density": 0.5, "brightness": 1, "scale": "A_FLAT_MAJOR_F_MINOR", "mute_bass": True,
                              "muteDrums": False, "onlyBassAndDrums": False, "music_generation_mode": "DIVERSITY"})
    assert got == {"temperature": 1.0, "topK": 40, "seed": 7, "guidance": 4.0, "bpm": 120, "density": 0.5,
                   "brightness": 1.0, "scale": "A_FLAT_MAJOR_F_MINOR", "muteBass": True, "muteDrums": False,
                   "onlyBassAndDrums": False, "musicGenerationMode": "DIVERSITY"}
    assert validation.music_config({"topK": 3, "musicGenerationMode": "QUALITY"}) == {"topK": 3,
                                                                                 "musicGenerationMode": "QUALITY"}
    assert validation.music_config(None) == {}


@pytest.mark.parametrize("cfg, param, words", [
    ({"bpm": 300}, "music_generation_config.bpm", "60 to 200"),
    ({"bpm": 90.5}, "music_generation_config.bpm", "whole number"),
    ({"scale": "C_MAJOR"}, "music_generation_config.scale", "C_MAJOR_A_MINOR"),
    ({"temperature": 3.5}, "music_generation_config.temperature", "0.0 to 3.0"),
    ({"topK": 0}, "music_generation_config.topK", "1 to 1000"),
    ({"density": "high"}, "music_generation_config.density", "0.0 to 1.0"),
    ({"mute_bass": 1}, "music_generation_config.mute_bass", "true or false"),
    ({"music_generation_mode": "FAST"}, "music_generation_config.music_generation_mode", "VOCALIZATION"),
    ({"seed": True}, "music_generation_config.seed", "whole number"),
    ({"volume": 1}, "music_generation_config.volume", "known settings"),
    ({"top_k": 5, "topK": 6}, "music_generation_config.topK", "twice"),
    ([1], "music_generation_config", "object"),
])
def test_config_errors(cfg, param, words):
    err = bad(validation.music_config, cfg)
    assert err.param == param and words in err.message


def test_wav_header():
    pcm = bytes(range(256)) * 750  # 48 000 frames
    with wave.open(io.BytesIO(wav_bytes(MusicResult(pcm, 48000, 2, 2)))) as w:
        assert (w.getnchannels(), w.getframerate(), w.getsampwidth(), w.getnframes()) == (2, 48000, 2, 48000)
        assert w.readframes(48000) == pcm


# Sessions against the fake

@pytest.fixture(scope="module")
def fake():
    with FakeLyria(key=KEY, chunk_seconds=0.5, chunk_delay=0.02) as server:
        yield server


@pytest.fixture
def upstream(fake, monkeypatch) -> UpstreamConfig:
    monkeypatch.setenv(ENV, KEY)
    return UpstreamConfig(name="lyria", kind="lyria", base_url=fake.url, api_key_env=ENV,
                          timeout_seconds=0.5, connect_timeout_seconds=2)


def run(upstream: UpstreamConfig, text: str = "solo piano", config: dict | None = None, seconds: float = 4,
        model: str = "lyria-realtime-exp") -> bytes:
    return lyria.generate_music(upstream, model, [{"text": text, "weight": 1.0}], config or {}, seconds)


@pytest.mark.parametrize("seconds", [4, 8, 4.01])
def test_exact_length(upstream, seconds):
    pcm = run(upstream, seconds=seconds)
    assert len(pcm) == lyria.pcm_bytes(seconds)
    assert pcm[:4] == b"\x00\x00\x00\x00" and pcm != bytes(len(pcm))  # the sine, not silence


def test_session_shape(fake, upstream):
    prompts = [{"text": "minimal techno", "weight": 1.0}, {"text": "piano", "weight": 0.5}]
    config = validation.music_config({"bpm": 90, "mute_bass": True, "scale": "D_MAJOR_B_MINOR"})
    lyria.generate_music(upstream, "models/lyria-realtime-exp", prompts, config, 4)
    session = fake.sessions[-1]
    assert session["headers"]["x-goog-api-key"] == KEY and KEY not in session["path"]
    messages = session["messages"]
    assert messages[:4] == [{"setup": {"model": "models/lyria-realtime-exp"}},
                            {"clientContent": {"weightedPrompts": prompts}},
                            {"musicGenerationConfig": {"bpm": 90, "muteBass": True, "scale": "D_MAJOR_B_MINOR"}},
                            {"playbackControl": "PLAY"}]
    deadline = time.monotonic() + 2  # STOP is recorded by the fake's thread, maybe just after we return
    while {"playbackControl": "STOP"} not in session["messages"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session["messages"][4] == {"playbackControl": "STOP"}


def test_no_config_frame_when_empty(fake, upstream):
    run(upstream)
    assert not any("musicGenerationConfig" in m for m in fake.sessions[-1]["messages"])


def test_filtered_prompt(upstream):
    with pytest.raises(ContentPolicyError) as info:
        run(upstream, "something [filter]")
    assert info.value.param == "prompt" and "filtered for safety" in info.value.message


def test_warning_is_logged_and_ignored(upstream, caplog):
    assert len(run(upstream, "jazz [warn]")) == lyria.pcm_bytes(4)
    assert any(r.name == "gateway.lyria" and "very short" in r.getMessage() for r in caplog.records)


def test_close_1011(upstream):
    with pytest.raises(UpstreamError) as info:
        run(upstream, "rock [close1011]")
    assert "1011" in info.value.message and "internal error" in info.value.message


def test_stall_times_out(upstream):
    start = time.monotonic()
    with pytest.raises(UpstreamTimeoutError):
        run(upstream, "ambient [stall]")
    assert time.monotonic() - start < 2


def test_no_setup_times_out(upstream):
    with pytest.raises(UpstreamTimeoutError) as info:
        run(upstream, model="lyria-realtime-exp[nosetup]")
    assert "setup" in info.value.message


def test_wrong_key(upstream, monkeypatch):
    monkeypatch.setenv(ENV, "wrong-key-456")
    with pytest.raises(UpstreamError) as info:
        run(upstream)
    assert "credentials" in info.value.message and "wrong-key-456" not in info.value.message
    assert KEY not in info.value.message


def test_missing_key(upstream, monkeypatch):
    monkeypatch.delenv(ENV)
    with pytest.raises(UpstreamError) as info:
        run(upstream)
    assert ENV in info.value.message


def test_connection_refused(upstream):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = UpstreamConfig(name="lyria", kind="lyria", base_url=f"ws://127.0.0.1:{port}/ws", api_key_env=ENV)
    with pytest.raises(UpstreamError):
        run(dead)


def test_http_base_url_is_a_config_error(upstream):
    with pytest.raises(UpstreamError) as info:
        run(UpstreamConfig(name="lyria", kind="lyria", base_url="https://example.invalid", api_key_env=ENV))
    assert "wss://" in info.value.message


def test_fake_accepts_snake_case_and_checks_order(fake):
    with connect(fake.url, additional_headers={"x-goog-api-key": KEY}, proxy=None) as ws:
        ws.send(json.dumps({"setup": {"model": "models/lyria-realtime-exp"}}))
        assert json.loads(ws.recv(timeout=2)) == {"setupComplete": {}}
        ws.send(json.dumps({"client_content": {"weighted_prompts": [{"text": "harp", "weight": 1}]}}))
        ws.send(json.dumps({"music_generation_config": {"bpm": "120"}}))
        ws.send(json.dumps({"playback_control": "PLAY"}))
        chunk = json.loads(ws.recv(timeout=2))["serverContent"]["audioChunks"][0]
        assert chunk["mimeType"] == "audio/l16;rate=48000;channels=2"
    with connect(fake.url, additional_headers={"x-goog-api-key": KEY}, proxy=None) as ws:
        ws.send(json.dumps({"playbackControl": "PLAY"}))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=2)
    assert fake.sessions[-1]["closed"][0] == 1007


CONCURRENT = """
from gevent import monkey
monkey.patch_all()
import json, sys, time
import gevent
sys.path.insert(0, {root!r})
from config import UpstreamConfig
from providers import lyria

up = UpstreamConfig(name="lyria", kind="lyria", base_url=sys.argv[1], api_key_env={env!r}, timeout_seconds=5)
gaps = [0.0]

def one():
    return len(lyria.generate_music(up, "lyria-realtime-exp", [{{"text": "x", "weight": 1.0}}], {{}}, 4))

def ticker():  # the hub's longest stall: large if a call blocks the process
    while True:
        t = time.monotonic()
        gevent.sleep(0.01)
        gaps.append(time.monotonic() - t - 0.01)

lyria.generate_music(up, "lyria-realtime-exp", [{{"text": "x", "weight": 1.0}}], {{}}, 0.5)  # warm-up: one chunk
start = time.monotonic()
one()
single = time.monotonic() - start
tick = gevent.spawn(ticker)
start = time.monotonic()
jobs = [gevent.spawn(one) for _ in range(5)]
gevent.joinall(jobs, timeout=20, raise_error=True)
total = time.monotonic() - start
tick.kill()
print(json.dumps({{"single": single, "total": total, "sizes": [j.value for j in jobs], "stall": max(gaps)}}))
"""


def test_concurrent_calls_under_gevent(tmp_path):
    """Five 4 s clips at once in a monkey-patched process take about as long as one (docs/runtime.md,
    "websockets sync client under gevent")."""
    script = tmp_path / "gevent_lyria.py"  # not concurrent.py: that would shadow the stdlib package
    script.write_text(textwrap.dedent(CONCURRENT.format(root=str(ROOT), env=ENV)))
    # The fake stays in this unpatched process, so only the gateway side runs on gevent.
    with FakeLyria(key=KEY, chunk_seconds=0.5, chunk_delay=0.1) as server:
        out = subprocess.run([sys.executable, str(script), server.url], capture_output=True, text=True,
                             timeout=30, env={**os.environ, ENV: KEY}, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["sizes"] == [lyria.pcm_bytes(4)] * 5
    assert result["total"] < 2.5 * result["single"], result
    assert result["stall"] < 0.3, result
