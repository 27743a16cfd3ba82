"""Every route's request fields, read and checked in one place, before the model is resolved or any credit moves.

One wording and one set of codes for every route:
- a required field that is absent: "Missing required parameter: 'x'." with code missing_required_parameter;
- a field that must be a JSON object or array and is something else: code invalid_type;
- any other value a field cannot take: "'x' must be <what it can be>, not <what was sent>." with code
  invalid_value (invalid_size for an image size, as OpenAI answers);
- a feature the gateway does not offer: code unsupported_value.
The param of each error names the field, also inside arrays (messages[2].content).

Each route has one reader here that returns the typed request its view works from; nothing after it reads
the client's body for a field it checks.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from errors import BadRequestError

MISSING = "missing_required_parameter"
INVALID_TYPE = "invalid_type"
INVALID_VALUE = "invalid_value"
UNSUPPORTED = "unsupported_value"


def _shown(value: Any) -> str:
    """The offending value as JSON, cut short: an error quotes what was sent, never a whole prompt."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def missing(param: str) -> BadRequestError:
    return BadRequestError(f"Missing required parameter: '{param}'.", param=param, code=MISSING)


def invalid(param: str, what: str, value: Any = None, *, code: str = INVALID_VALUE,
            show: bool = True) -> BadRequestError:
    """'param' must be what[, not value]."""
    tail = f", not {_shown(value)}" if show else ""
    return BadRequestError(f"'{param}' must be {what}{tail}.", param=param, code=code)


def is_number(value: Any) -> bool:
    """True for a finite int or float; JSON true/false arrive as bool, a subclass of int, and are not numbers.

    An integer too large for a float (JSON allows 400 digits) is no number here, so it is a 400, not an
    OverflowError."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def require(body: dict, name: str) -> Any:
    if body.get(name) is None:
        raise missing(name)
    return body[name]


def optional_int(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    """An integer field (JSON true/false and 2.0 are not integers) within low..high, or None when absent."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise invalid(name, f"an integer {span}", value)
    return value


def optional_bool(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(name, "true or false", value)
    return value


def optional_object(body: dict, name: str) -> dict | None:
    value = body.get(name)
    if value is not None and not isinstance(value, dict):
        raise invalid(name, "an object", value, code=INVALID_TYPE)
    return value


def one_of(body: dict, name: str, choices: tuple[str, ...], default: str | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return default
    if value not in choices:
        raise invalid(name, f"one of {', '.join(choices)}", value)
    return value


def require_text(body: dict, name: str, what: str = "a non-empty string") -> str:
    value = require(body, name)
    if not isinstance(value, str) or not value.strip():
        raise invalid(name, what, value)
    return value


def no_stream(body: dict, route: str) -> None:
    if body.get("stream") not in (None, False):
        raise BadRequestError(f"Streaming {route} is not supported by this gateway; leave 'stream' unset.",
                              param="stream", code=UNSUPPORTED)


# --- /v1/chat/completions and /v1/completions --------------------------------------------------------------

@dataclass(frozen=True)
class TextRequest:
    """A chat or legacy completion request: the fields the gateway itself reads."""

    route: str  # "chat" or "completions"
    body: dict
    model: str
    stream: bool
    client_usage: bool  # stream_options.include_usage
    client_cap: int | None  # the smaller of the client's output caps
    mult: int  # completions generated and billed per prompt: n, or best_of for legacy completions


def _messages(body: dict) -> None:
    msgs = require(body, "messages")
    if not isinstance(msgs, list) or not msgs:
        raise invalid("messages", "a non-empty array", show=False, code=INVALID_TYPE)
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise invalid(f"messages[{i}]", "an object with a 'role'", show=False, code=INVALID_TYPE)
        content = msg.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise invalid(f"messages[{i}].content", "a string or an array of parts", show=False,
                          code=INVALID_TYPE)


def text_request(route: str, body: dict) -> TextRequest:
    """OpenAI's required fields and the types of the fields the gateway itself uses."""
    if "model" not in body:
        raise missing("model")
    if route == "chat":
        _messages(body)
    else:
        prompt = require(body, "prompt")
        if not isinstance(prompt, (str, list)):
            raise invalid("prompt", "a string or an array", show=False, code=INVALID_TYPE)
    stream = bool(optional_bool(body, "stream"))
    options = optional_object(body, "stream_options") or {}
    max_tokens = optional_int(body, "max_tokens", 1)
    max_completion_tokens = optional_int(body, "max_completion_tokens", 1)
    # Chat reads both caps (the smaller wins); a legacy completion has only max_tokens.
    caps = [max_completion_tokens, max_tokens] if route == "chat" else [max_tokens]
    n = optional_int(body, "n", 1, 128) or 1
    best_of = optional_int(body, "best_of", 1, 20) or 1
    known = [c for c in caps if c is not None]
    return TextRequest(route=route, body=body, model=body["model"], stream=stream,
                       client_usage=bool(options.get("include_usage")), client_cap=min(known) if known else None,
                       mult=n if route == "chat" else max(n, best_of))  # best_of completions are billed


# --- /v1/images/generations -----------------------------------------------------------------------------------

MAX_IMAGES = 10
IMAGE_FORMATS = ("b64_json", "url")
_SIZE = re.compile(r"([1-9]\d{0,5})x([1-9]\d{0,5})")  # bounded so a megabyte of digits is refused, not parsed


@dataclass(frozen=True)
class ImagesRequest:
    body: dict
    model: str | None
    prompt: str
    n: int
    size: str | None  # "auto", "WxH" or None when the client sent none
    response_format: str | None


def images_request(body: dict) -> ImagesRequest:
    prompt = require_text(body, "prompt", "a non-empty string describing the image")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES):
        raise invalid("n", f"an integer from 1 to {MAX_IMAGES}", n)
    size = body.get("size")
    if size is not None and (not isinstance(size, str) or (size != "auto" and not _SIZE.fullmatch(size))):
        raise BadRequestError(f'size must be "auto" or WIDTHxHEIGHT in pixels, such as 1024x1024, not '
                              f'{_shown(size)}.', param="size", code="invalid_size")
    fmt = one_of(body, "response_format", IMAGE_FORMATS)
    no_stream(body, "image generation")
    return ImagesRequest(body=body, model=body.get("model"), prompt=prompt, n=n or 1, size=size,
                         response_format=fmt)


# --- /v1/audio/music ----------------------------------------------------------------------------------------

MIN_SECONDS = 4
MAX_SECONDS = 30
AUDIO_FORMATS = ("pcm", "wav")
SCALES = ("SCALE_UNSPECIFIED", "C_MAJOR_A_MINOR", "D_FLAT_MAJOR_B_FLAT_MINOR", "D_MAJOR_B_MINOR",
          "E_FLAT_MAJOR_C_MINOR", "E_MAJOR_D_FLAT_MINOR", "F_MAJOR_D_MINOR", "G_FLAT_MAJOR_E_FLAT_MINOR",
          "G_MAJOR_E_MINOR", "A_FLAT_MAJOR_F_MINOR", "A_MAJOR_G_FLAT_MINOR", "B_FLAT_MAJOR_G_MINOR",
          "B_MAJOR_A_FLAT_MINOR")
MUSIC_MODES = ("QUALITY", "DIVERSITY", "VOCALIZATION")
INT32 = (-(2**31), 2**31 - 1)  # seed is a proto int32; a bigger number would only fail upstream

# music_generation_config: snake_case name -> (its camelCase spelling, kind, allowed range or values). Both
# spellings are accepted; the camelCase one is also Lyria's wire name (docs/protocols.md, "Lyria RealTime").
MUSIC_SETTINGS: dict[str, tuple[str, str, Any]] = {
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
    "music_generation_mode": ("musicGenerationMode", "enum", MUSIC_MODES),
}
_CAMEL_TO_SNAKE = {camel: snake for snake, (camel, _, _) in MUSIC_SETTINGS.items()}


@dataclass(frozen=True)
class MusicRequest:
    model: str | None
    prompts: list[dict]  # [{"text", "weight"}]
    seconds: float  # clamped: what is generated, held, charged and reported
    config: dict = field(default_factory=dict)  # keyed by camelCase name
    response_format: str = "pcm"


def _prompt_list(items: Any, param: str) -> list[dict]:
    """A weighted-prompt list; errors name the offending element."""
    if not isinstance(items, list) or not items:
        raise invalid(param, 'a non-empty list of {"text": ..., "weight": ...} objects', show=False,
                      code=INVALID_TYPE)
    prompts = []
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise invalid(where, "an object with text and an optional weight", item, code=INVALID_TYPE)
        extra = sorted(set(item) - {"text", "weight"})
        if extra:
            raise BadRequestError(f"'{where}.{extra[0]}' is not supported; a prompt has only text and weight.",
                                  param=f"{where}.{extra[0]}", code=UNSUPPORTED)
        text = item.get("text")
        if not isinstance(text, str) or not text.strip():
            raise invalid(f"{where}.text", "a non-empty string", text)
        weight = item.get("weight", 1.0)
        # Lyria normalises weights, so 0 is meaningless there and refused; negative weights steer away.
        if not is_number(weight) or weight == 0:
            raise invalid(f"{where}.weight", "a non-zero number such as 1.0", weight)
        prompts.append({"text": text, "weight": float(weight)})
    return prompts


def music_prompts(body: dict) -> list[dict]:
    """The request's prompt or weighted_prompts (exactly one) as weighted prompts."""
    prompt, weighted = body.get("prompt"), body.get("weighted_prompts")
    if prompt is not None and weighted is not None:
        raise BadRequestError("Give either 'prompt' or 'weighted_prompts', not both.", param="prompt",
                              code=INVALID_VALUE)
    if weighted is not None:
        return _prompt_list(weighted, "weighted_prompts")
    if prompt is None:
        raise BadRequestError("Missing required parameter: 'prompt'. Describe the music, or send "
                              "weighted_prompts as a list of {\"text\": ..., \"weight\": ...} objects.",
                              param="prompt", code=MISSING)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise invalid("prompt", "a non-empty string", prompt)
        return [{"text": prompt, "weight": 1.0}]
    if isinstance(prompt, list):
        return _prompt_list(prompt, "prompt")
    raise invalid("prompt", 'a string or a list of {"text": ..., "weight": ...} objects', prompt)


def music_seconds(value: Any, default: float) -> float:
    """Seconds of music to make: the default when absent, otherwise clamped to MIN_SECONDS..MAX_SECONDS."""
    if value is None:
        value = default
    elif not is_number(value):
        raise invalid("duration_seconds", f"a number of seconds ({MIN_SECONDS} to {MAX_SECONDS})", value)
    return float(min(max(value, MIN_SECONDS), MAX_SECONDS))


def _setting(name: str, value: Any, kind: str, allowed: Any) -> Any:
    """One music_generation_config value checked against its kind and range; errors give the allowed values."""
    param = f"music_generation_config.{name}"
    if kind == "bool":
        if not isinstance(value, bool):
            raise invalid(param, "true or false", value)
        return value
    if kind == "enum":
        if value not in allowed:
            raise invalid(param, f"one of {', '.join(allowed)}", value)
        return value
    low, high = allowed
    if kind == "int":
        # 120.0 is accepted as 120: JSON from some clients does not distinguish the two.
        if not is_number(value) or value != int(value) or not low <= value <= high:
            raise invalid(param, f"a whole number from {low} to {high}", value)
        return int(value)
    if not is_number(value) or not low <= value <= high:
        raise invalid(param, f"a number from {low} to {high}", value)
    return float(value)


def music_config(cfg: Any) -> dict:
    """music_generation_config (snake_case or camelCase names), checked, keyed by camelCase name."""
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise invalid("music_generation_config", 'an object such as {"bpm": 120}', cfg, code=INVALID_TYPE)
    out: dict[str, Any] = {}
    for name, value in cfg.items():
        snake = name if name in MUSIC_SETTINGS else _CAMEL_TO_SNAKE.get(name)
        if snake is None:
            raise BadRequestError(f"'music_generation_config.{name}' is not a setting; known settings are: "
                                  f"{', '.join(MUSIC_SETTINGS)}.", param=f"music_generation_config.{name}",
                                  code=INVALID_VALUE)
        camel, kind, allowed = MUSIC_SETTINGS[snake]
        if camel in out:
            raise BadRequestError(f"'music_generation_config' sets {snake} twice (as {snake} and {camel}).",
                                  param=f"music_generation_config.{name}", code=INVALID_VALUE)
        out[camel] = _setting(name, value, kind, allowed)
    return out


def music_request(body: dict, default_seconds: float) -> MusicRequest:
    return MusicRequest(model=body.get("model"), prompts=music_prompts(body),
                        seconds=music_seconds(body.get("duration_seconds"), default_seconds),
                        config=music_config(body.get("music_generation_config")),
                        response_format=one_of(body, "response_format", AUDIO_FORMATS, "pcm") or "pcm")


# --- /v1/responses ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResponsesRequest:
    body: dict
    model: str
    stream: bool
    client_cap: int | None  # max_output_tokens


def responses_request(body: dict) -> ResponsesRequest:
    model = require(body, "model")
    items = require(body, "input")
    if not isinstance(items, (str, list)) or (isinstance(items, list) and not items):
        raise invalid("input", "a string or a non-empty array of input items", show=False, code=INVALID_TYPE)
    if isinstance(items, list):
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise invalid(f"input[{i}]", "an object", show=False, code=INVALID_TYPE)
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise invalid("instructions", "a string", body["instructions"], code=INVALID_TYPE)
    if body.get("tools") is not None and not isinstance(body["tools"], list):
        raise invalid("tools", "an array", show=False, code=INVALID_TYPE)
    stream = bool(optional_bool(body, "stream"))
    cap = optional_int(body, "max_output_tokens", 1)
    return ResponsesRequest(body=body, model=model, stream=stream, client_cap=cap)


# --- /v1/embeddings -----------------------------------------------------------------------------------------

MAX_EMBEDDING_INPUTS = 2048


@dataclass(frozen=True)
class EmbeddingsRequest:
    body: dict
    model: str
    texts: list[str]  # the inputs given as text, counted for the hold
    tokens: int  # the inputs given as token arrays: their length is their count


def _token_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in value)


def embeddings_request(body: dict) -> EmbeddingsRequest:
    model = require(body, "model")
    value = require(body, "input")
    what = "a string, an array of strings, an array of token integers or an array of token arrays"
    texts: list[str] = []
    count = 0
    if isinstance(value, str):
        texts = [value]
    elif _token_array(value):
        count = len(value)
    elif isinstance(value, list) and value and len(value) <= MAX_EMBEDDING_INPUTS:
        for i, item in enumerate(value):
            if isinstance(item, str):
                texts.append(item)
            elif _token_array(item):
                count += len(item)
            else:
                raise invalid(f"input[{i}]", "a string or a non-empty array of token integers", show=False,
                              code=INVALID_TYPE)
    else:
        raise invalid("input", f"{what} (at most {MAX_EMBEDDING_INPUTS} items)", show=False, code=INVALID_TYPE)
    if any(not t for t in texts):
        raise invalid("input", "non-empty strings", show=False)
    one_of(body, "encoding_format", ("float", "base64"))
    optional_int(body, "dimensions", 1, 100_000)
    return EmbeddingsRequest(body=body, model=model, texts=texts, tokens=count)


# --- /v1/audio/speech ---------------------------------------------------------------------------------------

SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MAX_SPEECH_CHARS = 4096


@dataclass(frozen=True)
class SpeechRequest:
    body: dict
    model: str
    text: str


def speech_request(body: dict) -> SpeechRequest:
    model = require(body, "model")
    text = require_text(body, "input")
    if len(text) > MAX_SPEECH_CHARS:
        raise invalid("input", f"at most {MAX_SPEECH_CHARS} characters", show=False)
    voice = require(body, "voice")
    if not (isinstance(voice, str) and voice) and not (isinstance(voice, dict) and isinstance(voice.get("id"), str)):
        raise invalid("voice", "a voice name or an object with an 'id'", voice)
    one_of(body, "response_format", SPEECH_FORMATS)
    one_of(body, "stream_format", ("audio", "sse"))
    speed = body.get("speed")
    if speed is not None and (not is_number(speed) or not 0.25 <= speed <= 4.0):
        raise invalid("speed", "a number from 0.25 to 4.0", speed)
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise invalid("instructions", "a string", body["instructions"], code=INVALID_TYPE)
    return SpeechRequest(body=body, model=model, text=text)


# --- /v1/audio/transcriptions and /translations (multipart) ---------------------------------------------------

TRANSCRIPTION_FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
MAX_AUDIO_FILE_BYTES = 25 * 1024 * 1024  # OpenAI's limit per file


@dataclass(frozen=True)
class TranscriptionRequest:
    model: str
    fields: list[tuple[str, str]]  # every form field but file and model, in order, passed on as they came
    response_format: str


def transcription_request(form: Any) -> TranscriptionRequest:
    """form is the request's MultiDict of text fields."""
    model = form.get("model")
    if not model:
        raise missing("model")
    fmt = form.get("response_format") or "json"
    if fmt not in TRANSCRIPTION_FORMATS:
        raise invalid("response_format", f"one of {', '.join(TRANSCRIPTION_FORMATS)}", fmt)
    if form.get("stream") not in (None, "", "false", "False"):
        raise BadRequestError("Streamed transcriptions are not supported by this gateway; leave 'stream' unset.",
                              param="stream", code=UNSUPPORTED)
    fields = [(k, v) for k, v in form.items(multi=True) if k not in ("model", "file", "stream")]
    return TranscriptionRequest(model=model, fields=fields, response_format=fmt)


# --- /v1/moderations ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModerationRequest:
    body: dict
    model: str | None
    texts: list[str]


def moderation_request(body: dict) -> ModerationRequest:
    value = require(body, "input")
    texts: list[str] = []
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise invalid("input", "a string, an array of strings or an array of input objects", show=False,
                      code=INVALID_TYPE)
    for i, item in enumerate(items):
        where = f"input[{i}]" if isinstance(value, list) else "input"
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif isinstance(item, dict) and item.get("type") == "image_url":
            continue
        else:
            raise invalid(where, "a string or a text or image_url input object", show=False, code=INVALID_TYPE)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "a string", model, code=INVALID_TYPE)
    return ModerationRequest(body=body, model=model, texts=texts)
