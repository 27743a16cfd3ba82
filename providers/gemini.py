"""Gemini REST image generation: OpenAI images requests to Gemini image models (generateContent) and Imagen (:predict).

Pure translation sits at the top and is tested without a server; the HTTP calls are at the bottom
(docs/protocols.md, "Gemini image output (generateContent)", "Imagen predict",
"Gemini errors").
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import gevent

from config import ModelConfig, UpstreamConfig
from errors import BadRequestError, ContentPolicyError, GatewayError, RateLimitError, UpstreamError
from providers.base import ImageResult
from providers.http import post, require_key, retry_after_seconds, scrub, scrubbed, status_error

ASPECT_RATIOS = {
    "gemini": ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"),
    "imagen": ("1:1", "3:4", "4:3", "9:16", "16:9"),
}
IMAGEN_MAX_SAMPLES = 4  # Imagen's sampleCount range is 1..4 per :predict call
# Candidate finish reasons that mean Google's filters, not a fault, kept the image back.
BLOCKED_REASONS = frozenset({"SAFETY", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "PROHIBITED_CONTENT",
                             "BLOCKLIST", "SPII", "RECITATION", "IMAGE_RECITATION"})
_SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")  # bounded so a megabyte of digits is rejected, not parsed

Image = dict[str, str]


def _obj(value: Any) -> dict:
    """value if it is a JSON object, else an empty one, so a malformed answer reads as missing fields."""
    return value if isinstance(value, dict) else {}


def _ratio(aspect: str) -> float:
    width, height = aspect.split(":")
    return int(width) / int(height)


def family(upstream_model: str) -> str:
    """"imagen" for Imagen models (:predict), else "gemini" (generateContent with image output)."""
    return "imagen" if upstream_model.startswith("imagen") else "gemini"


def aspect_ratio(size: str, family: str) -> str:
    """The aspect ratio the model family supports that is nearest to an OpenAI `size` ("auto" or "WxH")."""
    if size == "auto":
        return "1:1"
    match = _SIZE.fullmatch(size) if isinstance(size, str) else None
    if not match or int(match[1]) == 0 or int(match[2]) == 0:
        raise BadRequestError(f'size must be "auto" or WIDTHxHEIGHT in pixels, such as 1024x1024, not {size!r}.',
                             param="size", code="invalid_size")
    # In log space 2:1 and 1:2 are equally far from 1:1, so portrait and landscape sizes round alike.
    target = math.log(int(match[1]) / int(match[2]))
    return min(ASPECT_RATIOS[family], key=lambda aspect: abs(math.log(_ratio(aspect)) - target))


def generate_content_body(prompt: str, aspect: str) -> dict:
    """A generateContent request for one image (Gemini image models have no n)."""
    return {"contents": [{"role": "user", "parts": [{"text": prompt}]}],
            "generationConfig": {"responseModalities": ["TEXT", "IMAGE"], "imageConfig": {"aspectRatio": aspect}}}


def predict_body(prompt: str, n: int, aspect: str) -> dict:
    """An Imagen :predict request for n (1..4) images; the filter's reason is asked for, so a block is a 400."""
    return {"instances": [{"prompt": prompt}],
            "parameters": {"sampleCount": n, "aspectRatio": aspect, "includeRaiReason": True}}


def _blocked(reason: str) -> ContentPolicyError:
    return ContentPolicyError(f"The image request was blocked by the upstream's safety filter ({reason}).",
                         param="prompt")


def parse_generate_content(doc: Any) -> tuple[list[Image], str | None]:
    """The images and the model's text (a revised prompt) from a generateContent answer; no image raises."""
    block = _obj(_obj(doc).get("promptFeedback")).get("blockReason")
    if block:
        raise _blocked(block)
    images: list[Image] = []
    texts: list[str] = []
    reasons: list[str] = []
    for candidate in _obj(doc).get("candidates") or []:
        candidate = _obj(candidate)
        if candidate.get("finishReason"):
            reasons.append(str(candidate["finishReason"]))
        for part in _obj(candidate.get("content")).get("parts") or []:
            part = _obj(part)
            if part.get("thought"):
                continue  # thinking models may show drafts; only the final answer is the image asked for
            inline = _obj(part.get("inlineData"))
            mime = inline.get("mimeType")
            if isinstance(mime, str) and mime.startswith("image/") and isinstance(inline.get("data"), str):
                images.append({"b64_json": inline["data"], "mime_type": mime})
            elif isinstance(part.get("text"), str) and part["text"].strip():
                texts.append(part["text"].strip())
    text = "\n".join(texts) or None
    if images:
        return images, text
    blocked = next((reason for reason in reasons if reason in BLOCKED_REASONS), None)
    if blocked:
        raise _blocked(blocked)
    if not _obj(doc).get("candidates"):
        why = "no candidates"
    else:
        why = f"finishReason {', '.join(reasons)}" if reasons else "no finishReason"
    # The model's own words are often the only explanation ("I can't draw that").
    said = f': "{text[:300]}"' if text else "."
    raise UpstreamError(f"The upstream returned no image ({why}){said}")


def parse_predict(doc: Any) -> list[Image]:
    """The images from an Imagen :predict answer; filtered samples are dropped, and none left raises."""
    images: list[Image] = []
    filtered: list[str] = []
    for prediction in _obj(doc).get("predictions") or []:
        prediction = _obj(prediction)
        data = prediction.get("bytesBase64Encoded")
        if isinstance(data, str) and data:
            images.append({"b64_json": data, "mime_type": prediction.get("mimeType") or "image/png"})
        elif prediction.get("raiFilteredReason"):
            filtered.append(str(prediction["raiFilteredReason"]).rstrip("."))
    if images:
        return images
    if filtered:
        raise _blocked(filtered[0])
    raise UpstreamError("The upstream returned no image (no predictions in its answer).")


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """A header by name, whether headers is requests' case-insensitive dict or a plain one."""
    return next((value for key, value in (headers or {}).items() if key.lower() == name.lower()), None)


def error_from_response(upstream: UpstreamConfig, status: int, body_text: str,
                        headers: Mapping[str, str] | None) -> GatewayError:
    """The gateway error for one of Google's error answers (docs/protocols.md, "Gemini errors")."""
    try:
        doc = json.loads(body_text)
    except ValueError:
        return UpstreamError(f"The upstream '{upstream.name}' failed with HTTP {status} and a body that is not JSON.")
    if isinstance(doc, list) and len(doc) == 1:
        doc = doc[0]  # errors from streaming calls come wrapped in a one-element array
    error = _obj(_obj(doc).get("error"))
    message = str(error.get("message") or f"HTTP {status} with no message")
    details = [_obj(d) for d in error.get("details") or []] if isinstance(error.get("details"), list) else []
    if status in (401, 403) or (status == 400 and any(d.get("reason") == "API_KEY_INVALID" for d in details)):
        # The gateway's key, not the client's, was refused: a 401 would tell the client to fix its own key.
        # Google's message is left out so no part of a key can ever reach a client.
        label = "API_KEY_INVALID" if status == 400 else str(error.get("status") or "refused")
        return UpstreamError(f"The upstream '{upstream.name}' refused the gateway's own API key "
                             f"(HTTP {status} {label}); the operator must check {upstream.api_key_env}.")
    if status == 429:
        delay = next((d.get("retryDelay") for d in details
                      if str(d.get("@type", "")).endswith("google.rpc.RetryInfo")), None)
        seconds = retry_after_seconds(delay.strip().rstrip("s")) if isinstance(delay, str) else None
        seconds = seconds or retry_after_seconds(_header(headers, "Retry-After"))
        # Google's text speaks of "your quota"; say whose quota it is.
        return RateLimitError(f"The upstream '{upstream.name}' is rate limiting the gateway: "
                              f"{scrub(message, upstream)}", headers={"Retry-After": seconds} if seconds else {})
    return status_error(upstream, status, message)


# Network: one pooled POST per call, concurrent under gevent.

def _call(upstream: UpstreamConfig, url: str, body: dict, headers: dict[str, str],
          parse: Callable[[Any], list[Image]]) -> list[Image] | GatewayError:
    """One upstream call; its error is returned, not raised, so one failed image does not lose the others."""
    try:
        resp = post(upstream, url, body, headers)
        if resp.status_code != 200:
            return error_from_response(upstream, resp.status_code, resp.text, resp.headers)
        try:
            doc = resp.json()
        except ValueError:
            return UpstreamError(f"The upstream '{upstream.name}' answered HTTP 200 with a body that is not JSON.")
        return parse(doc)
    except GatewayError as exc:
        # Messages here may quote Google's words or the model's ("I can't draw that"); either may echo a key.
        return scrubbed(exc, upstream)


def _one_image(doc: Any) -> list[Image]:
    images, text = parse_generate_content(doc)
    # One image per call, so the images returned never exceed the n the caller held credits for.
    return [{**images[0], "revised_prompt": text} if text else images[0]]


def _at_most(count: int) -> Callable[[Any], list[Image]]:
    return lambda doc: parse_predict(doc)[:count]


def generate_images(upstream: UpstreamConfig, model: ModelConfig, prompt: str, n: int,
                    size: str) -> tuple[list[Image], list[GatewayError]]:
    """Up to n images as {"b64_json", "mime_type"[, "revised_prompt"]}, and one error per call that failed.

    A bad size, n or missing upstream key raises before any call; each upstream call's failure is collected
    instead, so the caller charges only for the images that came back and raises failures[0] if none did.
    """
    kind = family(model.upstream_model)
    aspect = aspect_ratio(size, kind)
    if not isinstance(n, int) or n < 1:
        raise BadRequestError(f"n must be a whole number of at least 1, not {n!r}.", param="n")
    # A header, never ?key=, so the key stays out of URLs that proxies and error messages might show.
    headers = {"x-goog-api-key": require_key(upstream)}
    base = f"{upstream.base_url.rstrip('/')}/models/{model.upstream_model}"
    if kind == "imagen":
        counts = [min(IMAGEN_MAX_SAMPLES, n - done) for done in range(0, n, IMAGEN_MAX_SAMPLES)]
        calls = [(f"{base}:predict", predict_body(prompt, count, aspect), _at_most(count)) for count in counts]
    else:
        calls = [(f"{base}:generateContent", generate_content_body(prompt, aspect), _one_image)] * n
    # Under the gunicorn gevent worker sockets are patched, so the calls overlap instead of queueing.
    greenlets = [gevent.spawn(_call, upstream, url, body, headers, parse) for url, body, parse in calls]
    gevent.joinall(greenlets)
    images: list[Image] = []
    failures: list[GatewayError] = []
    for greenlet in greenlets:
        result = greenlet.get()  # re-raises a bug in _call rather than passing it off as a missing image
        if isinstance(result, GatewayError):
            failures.append(result)
        else:
            images.extend(result)
    return images, failures


class GeminiProvider:
    """Images from Gemini image models and Imagen, answered as OpenAI's ImagesResponse (base64 or a data: URL;
    the gateway keeps no files)."""

    def images(self, upstream: UpstreamConfig, model: ModelConfig, body: dict, prompt: str, n: int,
               size: str | None, response_format: str | None) -> ImageResult:
        images, failures = generate_images(upstream, model, prompt, n, size or "auto")
        if not images:
            raise failures[0] if failures else UpstreamError(f"The upstream '{upstream.name}' returned no image.")
        data = []
        for image in images[:n]:
            item = ({"url": f"data:{image['mime_type']};base64,{image['b64_json']}"} if response_format == "url"
                    else {"b64_json": image["b64_json"]})
            if image.get("revised_prompt"):
                item["revised_prompt"] = image["revised_prompt"]
            data.append(item)
        return ImageResult(doc={"created": int(time.time()), "data": data}, count=len(data), failures=failures)


PROVIDER = GeminiProvider()
