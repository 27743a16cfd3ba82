"""Lyria RealTime music (PROTOCOLS.md 2.8): request validation and WAV packaging at the top, the websocket session
at the bottom. It returns raw PCM of exactly the requested length; keys, credits and Flask live elsewhere."""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import time
import wave
from contextlib import ExitStack
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException
from websockets.sync.client import ClientConnection, connect

from config import UpstreamConfig
from errors import BadRequestError, ContentPolicyError, UpstreamError, UpstreamTimeoutError
from providers.http import require_key, scrub

SAMPLE_RATE = 48000
CHANNELS = 2
SAMPLE_WIDTH = 2
MIN_SECONDS = 4
MAX_SECONDS = 30
DEFAULT_URL = ("wss://generativelanguage.googleapis.com/ws/"
               "google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateMusic")

SCALES = ("SCALE_UNSPECIFIED", "C_MAJOR_A_MINOR", "D_FLAT_MAJOR_B_FLAT_MINOR", "D_MAJOR_B_MINOR",
          "E_FLAT_MAJOR_C_MINOR", "E_MAJOR_D_FLAT_MINOR", "F_MAJOR_D_MINOR", "G_FLAT_MAJOR_E_FLAT_MINOR",
          "G_MAJOR_E_MINOR", "A_FLAT_MAJOR_F_MINOR", "A_MAJOR_G_FLAT_MINOR", "B_FLAT_MAJOR_G_MINOR",
          "B_MAJOR_A_FLAT_MINOR")
MODES = ("QUALITY", "DIVERSITY", "VOCALIZATION")
INT32 = (-(2**31), 2**31 - 1)  # seed is a proto int32; a bigger number would only fail upstream

# snake_case name -> (wire camelCase name, kind, allowed range or values); ranges from PROTOCOLS.md 2.8.
CONFIG_FIELDS: dict[str, tuple[str, str, Any]] = {
    "temperature": ("temperature", "float", (0.0, 3.0)),
    "top_k": ("topK", "int", (1, 1000)),
    "seed": ("seed", "int", INT32),
    "guidance": ("guidance", "float", (0.0, 6.0)),
    "bpm": ("bpm", "int", (60, 200)),
    "density": ("density", "float", (0.0, 1.0)),
    "brightness": ("brightness", "float", (0.0, 1.0)),
    "scale": ("scale", "enum", SCALES),
    "mute_bass": ("muteBass", "bool", None),
    "mute_drums": ("muteDrums", "bool", None),
    "only_bass_and_drums": ("onlyBassAndDrums", "bool", None),
    "music_generation_mode": ("musicGenerationMode", "enum", MODES),
}
_WIRE_TO_SNAKE = {wire: snake for snake, (wire, _, _) in CONFIG_FIELDS.items()}

# A closing handshake that hangs must not hold a worker's greenlet for websockets' default 10 s.
CLOSE_TIMEOUT = 2.0
# Real chunks are small; this bound only stops a broken upstream from making the gateway buffer without limit.
MAX_FRAME_BYTES = 64 * 1024 * 1024

log = logging.getLogger("gateway.lyria")


def _is_number(value: Any) -> bool:
    """True for a finite int or float; JSON true/false arrive as bool, a subclass of int, and are not numbers.

    An integer too large for a float (JSON allows 400 digits) is no number here, so it is a 400, not an
    OverflowError."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _prompt_list(items: Any, field: str) -> list[dict]:
    """A validated weighted-prompt list in wire form; errors name the offending element."""
    if not isinstance(items, list) or not items:
        raise BadRequestError(f"{field} must be a non-empty list of {{\"text\": ..., \"weight\": ...}} objects.",
                             param=field)
    prompts = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise BadRequestError(f"{where} must be an object with text and an optional weight.", param=where)
        extra = sorted(set(item) - {"text", "weight"})
        if extra:
            raise BadRequestError(f"{where}.{extra[0]} is not supported; a prompt has only text and weight.",
                                 param=f"{where}.{extra[0]}")
        text = item.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadRequestError(f"{where}.text must be a non-empty string.", param=f"{where}.text")
        weight = item.get("weight", 1.0)
        # Lyria normalises weights, so 0 is meaningless there and rejected; negative weights steer away.
        if not _is_number(weight) or weight == 0:
            raise BadRequestError(f"{where}.weight must be a non-zero number such as 1.0.", param=f"{where}.weight")
        prompts.append({"text": text, "weight": float(weight)})
    return prompts


def parse_prompts(body: dict) -> list[dict]:
    """The request's prompt or weighted_prompts (exactly one) as Lyria weightedPrompts."""
    prompt, weighted = body.get("prompt"), body.get("weighted_prompts")
    if prompt is not None and weighted is not None:
        raise BadRequestError("Give either prompt or weighted_prompts, not both.", param="prompt")
    if weighted is not None:
        return _prompt_list(weighted, "weighted_prompts")
    if prompt is None:
        raise BadRequestError("prompt is required: describe the music, or send weighted_prompts as a list of "
                             "{\"text\": ..., \"weight\": ...} objects.", param="prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRequestError("prompt must be a non-empty string.", param="prompt")
        return [{"text": prompt, "weight": 1.0}]
    if isinstance(prompt, list):
        return _prompt_list(prompt, "prompt")
    raise BadRequestError("prompt must be a string or a list of {\"text\": ..., \"weight\": ...} objects.",
                         param="prompt")


def parse_duration(value: Any, default: float) -> float:
    """Seconds of music to make: the default when absent, otherwise clamped to MIN_SECONDS..MAX_SECONDS."""
    if value is None:
        value = default
    elif not _is_number(value):
        raise BadRequestError(f"duration_seconds must be a number of seconds ({MIN_SECONDS} to {MAX_SECONDS}).",
                             param="duration_seconds")
    return float(min(max(value, MIN_SECONDS), MAX_SECONDS))


def pcm_bytes(seconds: float) -> int:
    """Exact PCM length for a clip: whole stereo 16-bit frames, so the WAV never ends mid-frame."""
    return round(seconds * SAMPLE_RATE) * CHANNELS * SAMPLE_WIDTH


def _config_value(name: str, value: Any, kind: str, allowed: Any) -> Any:
    """One musicGenerationConfig value checked against its kind and range; errors give the allowed values."""
    param = f"music_generation_config.{name}"
    if kind == "bool":
        if not isinstance(value, bool):
            raise BadRequestError(f"{param} must be true or false.", param=param)
        return value
    if kind == "enum":
        if value not in allowed:
            raise BadRequestError(f"{param} must be one of {', '.join(allowed)}.", param=param)
        return value
    low, high = allowed
    if kind == "int":
        # 120.0 is accepted as 120: JSON from some clients does not distinguish the two.
        if not _is_number(value) or value != int(value) or not low <= value <= high:
            raise BadRequestError(f"{param} must be a whole number from {low} to {high}.", param=param)
        return int(value)
    if not _is_number(value) or not low <= value <= high:
        raise BadRequestError(f"{param} must be a number from {low} to {high}.", param=param)
    return float(value)


def parse_config(cfg: Any) -> dict:
    """music_generation_config (snake_case or camelCase) as a validated Lyria musicGenerationConfig."""
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise BadRequestError("music_generation_config must be an object such as {\"bpm\": 120}.",
                             param="music_generation_config")
    wire: dict[str, Any] = {}
    for name, value in cfg.items():
        snake = name if name in CONFIG_FIELDS else _WIRE_TO_SNAKE.get(name)
        if snake is None:
            raise BadRequestError(f"music_generation_config.{name} is not a setting; known settings are: "
                                 f"{', '.join(CONFIG_FIELDS)}.", param=f"music_generation_config.{name}")
        camel, kind, allowed = CONFIG_FIELDS[snake]
        if camel in wire:
            raise BadRequestError(f"music_generation_config sets {snake} twice (as {snake} and {camel}).",
                                 param=f"music_generation_config.{name}")
        wire[camel] = _config_value(name, value, kind, allowed)
    return wire


def wav_bytes(pcm: bytes) -> bytes:
    """PCM from Lyria wrapped as a 48 kHz stereo 16-bit WAV file."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(CHANNELS)
        w.setsampwidth(SAMPLE_WIDTH)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm)
    return buf.getvalue()


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
    Under a gevent worker every wait here yields to other greenlets (RUNTIME.md 4)."""
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
