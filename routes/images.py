"""POST /v1/images/generations: validate, hold n images' price, generate, charge the images returned, settle.

Google models (upstream kind "gemini") go through providers/gemini.py and answer OpenAI's ImagesResponse with
base64 or a data: URL (the gateway keeps no files); OpenAI image models are relayed as they are. Some of n images
failing still answers the ones that came back, charged per image; none coming back answers the first error and
costs nothing. The ticket is settled on every path.
"""
from __future__ import annotations

import json
import logging
import re
import time

from flask import Response

import billing
from config import ModelConfig, UpstreamConfig
from errors import BadRequestError, UpstreamError
from metering import Ticket
from providers import gemini
from providers import openai as openai_provider
from providers.http import require_key

log = logging.getLogger("gateway")
MAX_N = 10
FORMATS = ("b64_json", "url")
_SIZE = re.compile(r"\d{1,6}x\d{1,6}")


def _prompt(body: dict) -> str:
    """The required prompt: a string with something in it."""
    prompt = body.get("prompt")
    if prompt is None:
        raise BadRequestError("Missing required parameter: 'prompt'.", param="prompt",
                             code="missing_required_parameter")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequestError("prompt must be a non-empty string describing the image.", param="prompt",
                             code="invalid_value")
    return prompt


def _n(body: dict) -> int:
    """How many images: 1 when absent, else a true integer from 1 to MAX_N."""
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise BadRequestError(f"n must be an integer from 1 to {MAX_N}, not {json.dumps(n)}.", param="n",
                             code="invalid_value")
    return n


def _check_options(body: dict, upstream: UpstreamConfig, model: ModelConfig) -> str | None:
    """size (checked against the model family for Google), response_format and stream; returns Google's size."""
    size = body.get("size")
    if upstream.kind == "gemini":
        size = "auto" if size is None else size
        gemini.aspect_ratio(size, gemini.family(model.upstream_model))  # raises the 400 naming size
    elif size is not None and (not isinstance(size, str) or (size != "auto" and not _SIZE.fullmatch(size))):
        raise BadRequestError(f'size must be "auto" or WIDTHxHEIGHT in pixels, such as 1024x1024, not '
                             f'{json.dumps(size)}.', param="size", code="invalid_size")
    fmt = body.get("response_format")
    if fmt is not None and fmt not in FORMATS:
        raise BadRequestError(f"response_format must be one of {', '.join(FORMATS)}, not {json.dumps(fmt)}.",
                             param="response_format", code="invalid_value")
    if body.get("stream") not in (None, False):
        raise BadRequestError("Streaming image generation is not supported by this gateway; leave stream unset.",
                             param="stream", code="unsupported_value")
    return size


def _google(ticket: Ticket, upstream: UpstreamConfig, model: ModelConfig, prompt: str, n: int, size: str,
            fmt: str) -> tuple[dict, int]:
    """Google's images as an ImagesResponse, and how many there are; raises the first error if none came."""
    images, failures = gemini.generate_images(upstream, model, prompt, n, size)
    if not images:
        raise failures[0] if failures else UpstreamError(f"The upstream '{upstream.name}' returned no image.")
    if failures:  # statuses only: a failure's text may quote the model, which may quote the prompt
        log.warning("request_id=%s model=%s got %d of %d images; the failed calls answered %s", ticket.request_id,
                    model.id, len(images), n, ",".join(str(f.status) for f in failures))
    data = []
    for image in images[:n]:
        item = ({"url": f"data:{image['mime_type']};base64,{image['b64_json']}"} if fmt == "url"
                else {"b64_json": image["b64_json"]})
        if image.get("revised_prompt"):
            item["revised_prompt"] = image["revised_prompt"]
        data.append(item)
    return {"created": int(time.time()), "data": data}, len(data)


def _openai(upstream: UpstreamConfig, model: ModelConfig, body: dict) -> tuple[dict, int]:
    """The OpenAI upstream's answer as it came (every other field passed on untouched), and its image count."""
    doc = openai_provider.generate_images(upstream, {**body, "model": model.upstream_model})
    if not isinstance(doc.get("data"), list):
        raise UpstreamError(f"The upstream '{upstream.name}' answered without 'data'.")
    return doc, len(doc["data"])


def handle(ticket: Ticket, body: dict) -> Response:
    """Run one image request end to end and answer OpenAI's ImagesResponse with the credit headers."""
    model, upstream = ticket.cfg.model_for(body.get("model"), "image", ticket.cfg.images.default_model)
    ticket.model = model.id
    prompt = _prompt(body)
    n = _n(body)
    size = _check_options(body, upstream, model)
    require_key(upstream)  # a missing upstream key is a 502 before any credit moves
    ticket.take_hold(billing.fixed(n * model.image_nano, f"{n} image(s) from {model.id}", "ask for fewer images (n)"))
    with ticket.settled_on_error():  # no image, no charge
        if upstream.kind == "gemini":
            fmt = body.get("response_format") or "b64_json"
            doc, count = _google(ticket, upstream, model, prompt, n, size or "auto", fmt)
        else:
            doc, count = _openai(upstream, model, body)
        count = min(count, n)  # never charge past the hold, whatever the upstream sent
        ticket.add(count * model.image_nano, 200, units=count)
        charged = ticket.settle(200)
    return Response(json.dumps(doc, separators=(",", ":")), mimetype="application/json",
                    headers=ticket.credit_headers(charged))
