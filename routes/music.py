"""POST /v1/audio/music: validate, hold the clip's price, generate it, settle, answer base64 PCM or WAV.

The clamped duration is what is generated, held, charged and reported. A clip is delivered in full or not at all
(the provider returns exactly the requested length or raises), so success charges the whole hold and any
failure settles at zero; the ticket is settled on every path.
"""
from __future__ import annotations

import base64
import io
import json
import time
import wave

from flask import Blueprint, Response, current_app

import providers
import routes
import validation
from billing import Ticket
from providers.base import MusicResult

bp = Blueprint("music", __name__)


@bp.post("/v1/audio/music")
def audio_music() -> Response:
    cfg = current_app.config["GATEWAY"]
    req = validation.music_request(routes.json_body(), cfg.music.default_duration_seconds)
    return handle(routes.ticket("audio.music"), req)


def wav_bytes(clip: MusicResult) -> bytes:
    """The clip's PCM wrapped as a WAV file."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(clip.channels)
        w.setsampwidth(clip.sample_width)
        w.setframerate(clip.sample_rate)
        w.writeframes(clip.pcm)
    return buf.getvalue()


def _seconds_json(seconds: float) -> int | float:
    """8.0 reports as 8, 4.5 as 4.5."""
    return int(seconds) if float(seconds).is_integer() else seconds


def handle(ticket: Ticket, req: validation.MusicRequest) -> Response:
    """Run one music request end to end and answer OpenAI-style JSON with the whole clip in data[0]."""
    cfg = current_app.config["GATEWAY"]
    model, upstream = routes.resolve(ticket, req.model, "music", cfg.music.default_model)
    ticket.hold_seconds(model, req.seconds, _seconds_json(req.seconds))
    with ticket.settled_on_error():  # a failed generation costs nothing
        clip = providers.for_upstream(upstream).music(upstream, model, req.prompts, req.config, req.seconds)
        if req.response_format == "wav":
            audio, mime = wav_bytes(clip), "audio/wav"
        else:
            audio, mime = clip.pcm, f"audio/l16;rate={clip.sample_rate};channels={clip.channels}"
        doc = {"created": int(time.time()), "model": model.id, "duration_seconds": _seconds_json(req.seconds),
               "data": [{"b64_audio": base64.b64encode(audio).decode("ascii"), "mime_type": mime,
                         "sample_rate": clip.sample_rate, "channels": clip.channels}]}
        ticket.add_seconds(model, req.seconds)  # delivered in full: charged the whole hold
        charged = ticket.settle(200)
    return Response(json.dumps(doc, separators=(",", ":")), mimetype="application/json",
                    headers=ticket.credit_headers(charged))
