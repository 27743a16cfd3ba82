"""Lyria RealTime music (docs/protocols.md, "Lyria RealTime"): implements MusicProvider over one websocket
session. It returns raw PCM of exactly the requested length; the request was validated before (validation.py),
and keys, credits and Flask live elsewhere."""
from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from contextlib import ExitStack
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException
from websockets.sync.client import ClientConnection, connect

from config import ModelConfig, UpstreamConfig
from errors import ContentPolicyError, UpstreamError, UpstreamTimeoutError
from providers.base import MusicResult
from providers.http import require_key, scrub

SAMPLE_RATE = 48000
CHANNELS = 2
SAMPLE_WIDTH = 2
DEFAULT_URL = ("wss://generativelanguage.googleapis.com/ws/"
               "google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateMusic")

# A closing handshake that hangs must not hold a worker's greenlet for websockets' default 10 s.
CLOSE_TIMEOUT = 2.0
# Real chunks are small; this bound only stops a broken upstream from making the gateway buffer without limit.
MAX_FRAME_BYTES = 64 * 1024 * 1024

log = logging.getLogger("gateway.lyria")


def pcm_bytes(seconds: float) -> int:
    """Exact PCM length for a clip: whole stereo 16-bit frames, so the WAV never ends mid-frame."""
    return round(seconds * SAMPLE_RATE) * CHANNELS * SAMPLE_WIDTH


def _scrub(text: str, upstream: UpstreamConfig) -> str:
    """Text from the upstream, short and without credentials, fit for an error message or a log line."""
    return scrub(text, upstream, 300)


def _field(obj: dict, camel: str, snake: str) -> Any:
    """A server field in either casing: the reference documents snake_case, the service and SDK use camelCase."""
    return obj[camel] if camel in obj else obj.get(snake)


def _open(stack: ExitStack, url: str, key: str, upstream: UpstreamConfig) -> ClientConnection:
    """The websocket, closed when `stack` exits; failures to open it are 502 (refused) or 504 (timed out)."""
    if not url.startswith(("ws://", "wss://")):
        raise UpstreamError(f"The upstream '{upstream.name}' base_url must be a ws:// or wss:// URL such as "
                            f"{DEFAULT_URL}.")
    try:
        # Entered as a context: websockets 17 deprecates bare connect(), and a later default connects on entry,
        # so entering here keeps every handshake failure inside this error mapping.
        return stack.enter_context(connect(
            url, additional_headers={"x-goog-api-key": key},  # a header keeps the key out of URLs and logs
            open_timeout=upstream.connect_timeout_seconds, close_timeout=CLOSE_TIMEOUT,
            max_size=MAX_FRAME_BYTES, proxy=None))  # proxy=None: an operator's HTTP_PROXY must not reroute it
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise UpstreamError(f"The music upstream refused the gateway's credentials (HTTP {status}); check the "
                                f"key in {upstream.api_key_env}.") from None
        body = _scrub(exc.response.body.decode("utf-8", "replace").strip(), upstream) if exc.response.body else ""
        raise UpstreamError(f"The music upstream rejected the connection with HTTP {status}"
                            f"{': ' + body if body else ''}.") from None
    except TimeoutError:  # before OSError: TimeoutError is a subclass of it
        raise UpstreamTimeoutError(f"The music upstream did not accept a connection within "
                              f"{upstream.connect_timeout_seconds:g} s.") from None
    except InvalidURI:
        raise UpstreamError(f"The upstream '{upstream.name}' base_url is not a valid websocket URL.") from None
    except (OSError, WebSocketException) as exc:
        raise UpstreamError(f"Could not connect to the music upstream: {_scrub(str(exc), upstream)}.") from None


def _recv(ws: ClientConnection, deadline: float, idle: float) -> dict:
    """The next JSON frame; TimeoutError when the upstream is silent for `idle` s or the deadline passes."""
    timeout = min(idle, deadline - time.monotonic())
    if timeout <= 0:
        raise TimeoutError
    raw = ws.recv(timeout=timeout)  # Lyria may send JSON in binary frames; json.loads takes both
    try:
        msg = json.loads(raw)
    except ValueError:
        raise UpstreamError("The music upstream sent a frame that is not JSON.") from None
    if not isinstance(msg, dict):
        raise UpstreamError("The music upstream sent a JSON frame that is not an object.")
    return msg


def _collect(ws: ClientConnection, want: int, deadline: float, idle: float,
             upstream: UpstreamConfig) -> bytearray:
    """Audio chunks until `want` bytes have arrived, raising on a filtered prompt; warnings are only logged."""
    pcm = bytearray()
    while len(pcm) < want:
        msg = _recv(ws, deadline, idle)
        content = _field(msg, "serverContent", "server_content")
        filtered = _field(msg, "filteredPrompt", "filtered_prompt")
        if isinstance(content, dict):
            for chunk in _field(content, "audioChunks", "audio_chunks") or []:
                try:
                    data = chunk.get("data") or ""
                    # proto3 JSON readers accept URL-safe base64 too, so a writer may use it; map it to standard.
                    pcm += base64.b64decode(data.replace("-", "+").replace("_", "/"), validate=True)
                except (binascii.Error, AttributeError, TypeError, ValueError):
                    raise UpstreamError("The music upstream sent an audio chunk that is not base64.") from None
        elif filtered is not None:
            filtered = filtered if isinstance(filtered, dict) else {}
            reason = _field(filtered, "filteredReason", "filtered_reason") or "no reason given"
            text = str(filtered.get("text") or "")[:100]
            raise ContentPolicyError(f"The music prompt {text!r} was blocked by the upstream's safety filter: {reason}",
                                param="prompt")
        elif "warning" in msg:
            log.warning("Lyria warning (generation continues): %s", _scrub(str(msg["warning"]), upstream))
    return pcm


def generate_music(upstream: UpstreamConfig, model: str, prompts: list[dict], config: dict,
                   seconds: float) -> bytes:
    """Exactly pcm_bytes(seconds) bytes of 48 kHz stereo 16-bit PCM from one Lyria RealTime session.

    Time limits: opening the socket gets connect_timeout_seconds; after that the upstream may be silent for at
    most timeout_seconds at a stretch (setup included), and the whole call must end within connect_timeout_seconds
    + timeout_seconds + 2 x seconds: Lyria streams about as fast as playback, so twice the clip length plus
    start-up slack is generous while still bounding an upstream that trickles audio.
    Under a gevent worker every wait here yields to other greenlets (docs/runtime.md, "websockets sync client
    under gevent")."""
    key = require_key(upstream)
    want = pcm_bytes(seconds)
    idle = upstream.timeout_seconds
    deadline = time.monotonic() + upstream.connect_timeout_seconds + idle + 2 * seconds
    phase = "setup"
    # The stack closes the socket on every path out, as a try/finally would (code 1011 if we are raising).
    with ExitStack() as stack:
        ws = _open(stack, upstream.base_url, key, upstream)
        try:
            name = model if model.startswith("models/") else f"models/{model}"
            ws.send(json.dumps({"setup": {"model": name}}))
            # The protocol forbids anything before setupComplete; other frames here (e.g. a warning) are skipped.
            while _field(_recv(ws, deadline, idle), "setupComplete", "setup_complete") is None:
                pass
            phase = "streaming"
            ws.send(json.dumps({"clientContent": {"weightedPrompts": prompts}}))
            if config:
                ws.send(json.dumps({"musicGenerationConfig": config}))
            ws.send(json.dumps({"playbackControl": "PLAY"}))
            pcm = _collect(ws, want, deadline, idle, upstream)
            try:
                ws.send(json.dumps({"playbackControl": "STOP"}))  # polite; closing ends the session anyway
            except ConnectionClosed:
                pass
            return bytes(pcm[:want])
        except ConnectionClosed as exc:
            code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "connection lost")
            reason = _scrub(reason, upstream) or "no reason given"
            raise UpstreamError(f"The music upstream closed the session during {phase} before the clip was "
                                f"complete (close code {code}: {reason}).") from None
        except TimeoutError:
            what = "did not finish setup" if phase == "setup" else f"did not deliver {seconds:g} s of audio"
            raise UpstreamTimeoutError(f"The music upstream {what} in time.") from None


class LyriaProvider:
    """Music over Lyria RealTime's websocket."""

    def music(self, upstream: UpstreamConfig, model: ModelConfig, prompts: list[dict], config: dict,
              seconds: float) -> MusicResult:
        pcm = generate_music(upstream, model.upstream_model, prompts, config, seconds)
        return MusicResult(pcm=pcm, sample_rate=SAMPLE_RATE, channels=CHANNELS, sample_width=SAMPLE_WIDTH)


PROVIDER = LyriaProvider()
