"""POST /v1/audio/speech, /v1/audio/transcriptions and /v1/audio/translations.

Speech: the hold is the input's price (per million characters, plus the token price of the input and the most
audio tokens for token-priced models); the audio is relayed as it arrives with the upstream's content type. A
character-priced clip costs its characters once any audio reached the client (the upstream bills the whole input
however the stream ends); a token-priced one costs the upstream's usage report, or the hold when none came.
Nothing reached the client and the upstream failed: nothing is charged.

Transcription: the multipart upload is parsed by Werkzeug, which spools a file above 500 KB to a temporary file
instead of memory, and is then streamed from that file to the upstream in 64 KB blocks. Spooling, not passing
the body through, because the gateway must read the form's fields (model, response_format) before the hold and
before the upstream is chosen, and may find them after the file; and it sends the upstream its own model name.
The charge, in this order: the answer's usage (tokens for token-priced models, `seconds` for duration-priced
ones); verbose_json's `duration`; for srt and vtt, the end of the last cue (a lower bound of the audio's
length); otherwise (text answers of duration-priced models, answers without usage) the hold, which is the file
size's estimate, marked estimated. A transcription is never charged nothing silently.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, request

import billing
import providers
import routes
import tokens
import validation
from auth import UPLOAD_BODY_BYTES
from errors import BadRequestError, GatewayError, PayloadTooLargeError

bp = Blueprint("audio", __name__)
_MIME = re.compile(r"[\w.+-]+/[\w.+-]+")
_CUE_END = re.compile(r"-->\s*(?:(\d+):)?(\d{1,2}):(\d{2})[.,](\d{1,3})")


@bp.post("/v1/audio/speech")
def speech() -> Response:
    req = validation.speech_request(routes.json_body())
    return handle_speech(routes.ticket("audio.speech"), req)


def handle_speech(ticket: billing.Ticket, req: validation.SpeechRequest) -> Response:
    model, upstream = routes.resolve(ticket, req.model, "speech")
    chars = len(req.text)
    priced_tokens = billing.token_priced(model)
    prompt = req.text + (req.body.get("instructions") or "")
    # Token-priced: the prompt's worst case (a token per byte is beyond any BPE) and the model's most audio tokens.
    token_hold = billing.token_cost(model, tokens.most(prompt), model.max_output_tokens) \
        if priced_tokens else 0
    ticket.hold_fixed(billing.chars_cost(model, chars) + token_hold, f"{chars} characters of speech from {model.id}",
                      "send a shorter input")
    with ticket.settled_on_error():
        result = providers.for_upstream(upstream).speech(upstream, model, {**req.body, "model": model.upstream_model},
                                                         priced_tokens)

    def body() -> Iterator[bytes]:
        delivered, status = 0, 499  # a client that goes away never reaches the end
        try:
            for chunk in result.chunks():
                yield chunk
                delivered += len(chunk)
            status = 200
        except GatewayError as exc:
            status = exc.status  # the headers are gone: the audio just ends
        finally:
            result.close()
            if delivered:
                if model.char_npm:
                    ticket.add_chars(model, chars)
                if priced_tokens:
                    usage = billing.read_usage(result.usage_report)
                    if usage is not None:
                        ticket.add_usage(model, usage, status)
                    else:  # no report: the hold's token part, marked estimated
                        ticket.add(token_hold, status, prompt_tokens=tokens.count(prompt), estimated=True)
                if not ticket.charges:
                    ticket.add(0, status)
                for charge in ticket.charges:
                    charge.status = status
            ticket.settle(status)

    return Response(body(), content_type=result.content_type, headers={"Cache-Control": "no-cache"})


@bp.post("/v1/audio/transcriptions")
def transcriptions() -> Response:
    return handle_transcription(routes.ticket("audio.transcriptions"), "transcriptions")


@bp.post("/v1/audio/translations")
def translations() -> Response:
    return handle_transcription(routes.ticket("audio.translations"), "translations")


def _cue_seconds(text: str) -> float | None:
    """The end of the last cue of an srt or vtt answer, in seconds."""
    last = None
    for m in _CUE_END.finditer(text):
        last = m
    if last is None:
        return None
    hours, minutes, seconds, millis = last.groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + int(millis.ljust(3, "0")) / 1000


def _seconds(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10**6:
        return None
    return float(value)


def handle_transcription(ticket: billing.Ticket, route: str) -> Response:
    cfg = current_app.config["GATEWAY"]
    request.max_content_length = max(cfg.server.max_body_bytes, UPLOAD_BODY_BYTES)
    if not (request.mimetype or "").startswith("multipart/form-data"):
        raise BadRequestError("Send the audio as multipart/form-data with a 'file' and a 'model' field.",
                              param="file", code="invalid_type")
    req = validation.transcription_request(request.form)
    upload = request.files.get("file")
    if upload is None:
        raise validation.missing("file")
    stream = upload.stream
    stream.seek(0, 2)
    size = stream.tell()
    if size == 0:
        raise BadRequestError("The audio file is empty.", param="file", code="invalid_value")
    if size > validation.MAX_AUDIO_FILE_BYTES:
        raise PayloadTooLargeError(f"The audio file is {size} bytes; the limit is {validation.MAX_AUDIO_FILE_BYTES}.")
    model, upstream = routes.resolve(ticket, req.model, "transcription")
    hold, estimate_seconds = billing.transcription_hold(model, size)
    ticket.hold_fixed(hold, f"transcribing a {size}-byte file with {model.id}", "send a shorter file")
    mime = upload.mimetype if _MIME.fullmatch(upload.mimetype or "") else "application/octet-stream"
    with ticket.settled_on_error():
        result = providers.for_upstream(upstream).transcription(
            upstream, route, [("model", model.upstream_model), *req.fields], upload.filename or "audio", mime,
            stream, size)
        doc = result.doc or {}
        report = doc.get("usage") if isinstance(doc.get("usage"), dict) else {}
        token_usage = billing.read_usage(report) if report.get("type") == "tokens" else None
        seconds = _seconds(report.get("seconds")) if report.get("type") == "duration" else None
        estimated = False
        if seconds is None:
            seconds = _seconds(doc.get("duration"))
        if seconds is None and req.response_format in ("srt", "vtt"):
            seconds = _cue_seconds(result.body.decode("utf-8", "replace"))
            estimated = seconds is not None
        if billing.token_priced(model) and token_usage is not None:
            ticket.add_usage(model, token_usage, 200)
        elif billing.duration_priced(model) and seconds is not None:
            ticket.add_duration(model, seconds, estimated=estimated)
        elif billing.token_priced(model) or billing.duration_priced(model):
            ticket.add(hold, 200, units=estimate_seconds, estimated=True)
        else:
            ticket.add(0, 200)
        charged = ticket.settle(200)
    return Response(result.body, content_type=result.content_type, headers=ticket.credit_headers(charged))
