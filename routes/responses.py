"""POST /v1/responses: validate, refuse what the upstream cannot do, hold tokens, call the provider, settle.

Upstreams with `responses_api = true` get the request relayed (their typed events passed through as they
arrive); the others get it translated to chat completions by the provider (providers/responses_chat.py). Either
way the hold is chat's (the prompt estimate, max_output_tokens as the one cap sent upstream) and the charge is
the final Response's usage, or what was delivered when the stream broke or no usage was believable.
"""
from __future__ import annotations

import json
from functools import partial
from typing import Any

from flask import Blueprint, Response, current_app

import billing
import providers
import routes
import safefetch
import tokens
import validation
from config import Config
from errors import GatewayError
from providers.base import ResponsesEvent
from routes.relay import Relay

bp = Blueprint("responses", __name__)


@bp.post("/v1/responses")
def create_response() -> Response:
    req = validation.responses_request(routes.json_body())
    return handle(routes.ticket("responses"), req, current_app.config["GATEWAY"].server.heartbeat_seconds)


def _strings(value: Any, out: list[str]) -> None:
    """The text a client sent in input items (texts, call arguments and outputs), not the JSON around it."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(v for k, v in item.items()
                         if k in ("content", "text", "arguments", "output", "name") or isinstance(v, (list, dict)))


def prompt_text(body: dict) -> str:
    """What the prompt's tokens are estimated (and, without a usage report, counted) from: instructions, the
    input's text and the tools' JSON."""
    parts: list[str] = []
    if isinstance(body.get("instructions"), str):
        parts.append(body["instructions"])
    _strings(body.get("input"), parts)
    if body.get("tools"):
        parts.append(json.dumps(body["tools"], ensure_ascii=False))
    return "\n".join(parts)


def check_image_urls(cfg: Config, body: dict) -> None:
    """Refuse input_image URLs an upstream would fetch from an address the gateway itself may not reach.

    A local upstream (vLLM, Ollama) or a translated chat call fetches http(s) image URLs itself, so each one's
    host is checked against the gateway's own fetch rules first, as chat's image parts are; `data:` URLs carry
    their bytes and pass. A refusal is a 400 naming the part, before any credit moves.
    """
    items = body.get("input")
    for i, item in enumerate(items if isinstance(items, list) else []):
        content = item.get("content") if isinstance(item, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            url = part.get("image_url") if isinstance(part, dict) and part.get("type") == "input_image" else None
            if not isinstance(url, str):
                continue
            where = f"input[{i}].content[{j}].image_url"
            scheme = url.split(":", 1)[0].strip().lower() if ":" in url else ""
            if scheme == "data":
                continue
            try:
                if scheme not in ("http", "https"):
                    raise safefetch.ImageRefusedError(f"scheme '{scheme[:20]}' is not allowed; send an http(s) or "
                                                      "a data:image/... URL.")
                safefetch.check_url(url, allow_loopback=cfg.vision.allow_loopback_image_hosts,
                                    timeout=cfg.vision.fetch_timeout_seconds)
            except safefetch.ImageRefusedError as exc:
                raise safefetch.ImageRefusedError(f"{where}: {exc.message}", param=where) from None


def handle(ticket: billing.Ticket, req: validation.ResponsesRequest, heartbeat: float) -> Response:
    model, upstream = routes.resolve(ticket, req.model, "chat")
    check_image_urls(ticket.cfg, req.body)
    provider = providers.for_upstream(upstream)
    up_body = dict(req.body)
    up_body["model"] = model.upstream_model
    provider.check_responses(upstream, up_body)  # an untranslatable field is a 400 before any credit moves
    text = prompt_text(req.body)
    exact_prompt = partial(tokens.count, text)
    out_cap = ticket.hold_tokens(model, tokens.estimate(text), exact_prompt, 1, req.client_cap)
    up_body["max_output_tokens"] = out_cap  # the one cap, as held
    with ticket.settled_on_error():
        if not req.stream:
            result = provider.responses(upstream, up_body)
            usage = billing.read_usage(result.usage_report)
            estimated = usage is None
            if usage is None:
                usage = billing.Usage(exact_prompt(), sum(tokens.count(t) for t in result.texts))
            ticket.add_usage(model, usage, 200, estimated=estimated)
            charged = ticket.settle(200)
            doc = result.doc
            return Response(billing.dumps_with_cost(doc, doc.get("usage") if isinstance(doc.get("usage"), dict)
                                                    else None, charged),
                            mimetype="application/json", headers=ticket.credit_headers(charged))
        stream = provider.responses_stream(upstream, up_body)
    relay = ResponsesRelay(ticket, model, upstream, stream, exact_prompt, False, heartbeat)
    return Response(relay.run(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class ResponsesRelay(Relay):
    """The chat relay's heartbeats and settlement, over typed Responses events relayed as they are: the final
    response.completed (or .incomplete / .failed) event carries the usage that is charged."""

    stream: Any

    def _event(self, event: ResponsesEvent) -> tuple[bytes, dict[int, str]] | None:  # type: ignore[override]
        if event.usage_report is not None:
            usage = billing.read_usage(event.usage_report)
            if usage is not None:
                self.usage, self.usage_doc = usage, event.usage_report
        return event.data, event.texts

    def _end(self) -> bytes:
        return b""  # the terminal event was the last one relayed

    def _failed(self, exc: GatewayError) -> bytes:
        return self.stream.failed(exc)
