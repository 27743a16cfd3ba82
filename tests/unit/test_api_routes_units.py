"""Pure parts of the new routes: the Responses usage shape, audio prices, subtitle durations, cors_origins."""
from __future__ import annotations

from decimal import Decimal

import pytest

import billing
import config
from config import ModelConfig
from errors import ConfigError
from routes.audio import _cue_seconds


def model(**prices: str) -> ModelConfig:
    return ModelConfig(id="m", upstream="u", upstream_model="m", **{k: Decimal(v) for k, v in prices.items()})


def test_read_usage_takes_the_responses_shape():
    report = {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 200},
              "output_tokens": 500, "output_tokens_details": {"reasoning_tokens": 100}, "total_tokens": 1500}
    assert billing.read_usage(report) == billing.Usage(1000, 500, 200, 100)
    # the audio endpoints' spelling of the details, and reports that are not believable
    assert billing.read_usage({"type": "tokens", "input_tokens": 25, "output_tokens": 9,
                               "input_token_details": {"audio_tokens": 25}}) == billing.Usage(25, 9)
    assert billing.read_usage({"input_tokens": -1, "output_tokens": 2}) is None
    assert billing.read_usage({"input_tokens": 3, "output_tokens": True}) is None


def test_audio_prices_are_exact():
    assert billing.chars_cost(model(per_million_characters="15.00"), 17) == 255_000
    assert billing.chars_cost(model(per_million_characters="0.000000001"), 1) == 1  # rounded up, never 0
    whisper = model(per_minute="0.006")
    assert billing.duration_cost(whisper, 3) == 300_000
    assert billing.duration_cost(whisper, 2.5) == 250_000
    assert billing.duration_cost(model(per_minute="0.007"), 1) == 116_667  # 7e6 / 60, rounded up
    assert billing.duration_cost(model(per_second="0.001", per_minute="0.06"), 2) == 4_000_000


def test_transcription_hold_from_size():
    amount, seconds = billing.transcription_hold(model(per_minute="0.006"), 80_044)
    assert (amount, seconds) == (41 * 100_000, 41.0)
    tokens, _ = billing.transcription_hold(model(input_price="2.50", output_price="10.00"), 2000)
    assert tokens == (10 * 2_500_000_000 + 4 * 10_000_000_000) // 10**6


@pytest.mark.parametrize("text, seconds", [
    ("1\n00:00:00,000 --> 00:00:02,500\nHi\n\n2\n00:00:02,500 --> 00:01:03,04\nYo\n", 63.04),
    ("WEBVTT\n\n00:00.000 --> 00:03.250\nHi\n", 3.25),
    ("WEBVTT\n\n01:00:00.000 --> 01:00:01.5\nHi\n", 3601.5),
    ("no cues at all", None),
])
def test_cue_seconds(text, seconds):
    assert _cue_seconds(text) == seconds


def test_cors_origins_setting():
    cfg = config.parse({"server": {"cors_origins": ["https://app.example.com/", "http://localhost:3000"]}})
    assert cfg.server.cors_origins == ("https://app.example.com", "http://localhost:3000")
    assert config.parse({}).server.cors_origins == ()
    for bad in (["https://app.example.com/path"], ["ftp://x"], "https://a.example", [3], ["app.example.com"]):
        with pytest.raises(ConfigError, match="cors_origins"):
            config.parse({"server": {"cors_origins": bad}})


def test_new_modes_and_prices_in_the_shipped_config():
    cfg = config.load("config.toml")
    modes = {m.mode for m in cfg.models.values()}
    assert {"embedding", "speech", "transcription", "moderation"} <= modes
    assert cfg.upstreams["openai"].responses_api and not cfg.upstreams["gemini-openai"].responses_api
    assert cfg.models["tts-1"].char_npm == 15 * 10**9 and cfg.models["whisper-1"].minute_nano == 6_000_000
    assert cfg.models["omni-moderation-latest"].input_npm == 0
