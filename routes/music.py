"""POST /v1/audio/music: validate, hold the clip's price, generate it over Lyria RealTime, settle, answer base64.

The clamped duration is what is generated, held, charged and reported. A clip is delivered in full or not at all
(providers/lyria.py returns exactly pcm_bytes(seconds) or raises), so success charges the whole hold and any
failure settles at zero; the ticket is settled on every path.
"""
from __future__ import annotations

import base64
import json
import time
from decimal import ROUND_CEILING, Decimal

from flask import Response

import billing
from config import ModelConfig
from errors import BadRequestError
from metering import Ticket
from providers import lyria
from providers.http import require_key

PCM_MIME = f"audio/l16;rate={lyria.SAMPLE_RATE};channels={lyria.CHANNELS}"
WAV_MIME = "audio/wav"
FORMATS = ("pcm", "wav")


def _format(body: dict) -> str:
    """response_format: "pcm" (the default) or "wav"."""
    value = body.get("response_format")
    if value is None:
        return "pcm"
    if value not in FORMATS:
        raise BadRequestError(f"response_format must be one of {', '.join(FORMATS)}, not {json.dumps(value)}.",
                             param="response_format", code="invalid_value")
    return value


def hold_amount(model: ModelConfig, seconds: float) -> int:
    """seconds x the per-second price in nano-credits, rounded up to a whole nano-credit; exact decimal math."""
    exact = Decimal(str(seconds)) * model.second_nano
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def _seconds_json(seconds: float) -> int | float:
    """8.0 reports as 8, 4.5 as 4.5."""
    return int(seconds) if float(seconds).is_integer() else seconds


def handle(ticket: Ticket, body: dict) -> Response:
    """Run one music request end to end and answer OpenAI-style JSON with the whole clip in data[0]."""
    cfg = ticket.cfg
    model, upstream = cfg.model_for(body.get("model"), "music", cfg.music.default_model)
    ticket.model = model.id
    prompts = lyria.parse_prompts(body)
    seconds = lyria.parse_duration(body.get("duration_seconds"), cfg.music.default_duration_seconds)
    config = lyria.parse_config(body.get("music_generation_config"))
    fmt = _format(body)
    require_key(upstream)  # a missing upstream key is a 502 before any credit moves
    amount = hold_amount(model, seconds)
    ticket.take_hold(billing.fixed(amount, f"{_seconds_json(seconds)} s of music from {model.id}",
                                   "ask for a shorter duration_seconds"))
    with ticket.settled_on_error():  # a failed generation costs nothing
        pcm = lyria.generate_music(upstream, model.upstream_model, prompts, config, seconds)
        audio, mime = (lyria.wav_bytes(pcm), WAV_MIME) if fmt == "wav" else (pcm, PCM_MIME)
        doc = {"created": int(time.time()), "model": model.id, "duration_seconds": _seconds_json(seconds),
               "data": [{"b64_audio": base64.b64encode(audio).decode("ascii"), "mime_type": mime,
                         "sample_rate": lyria.SAMPLE_RATE, "channels": lyria.CHANNELS}]}
        ticket.add(amount, 200, units=seconds)  # delivered in full: charged the whole hold
        charged = ticket.settle(200)
    return Response(json.dumps(doc, separators=(",", ":")), mimetype="application/json",
                    headers=ticket.credit_headers(charged))
