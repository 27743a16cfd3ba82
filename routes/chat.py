"""POST /v1/chat/completions and /v1/completions: validate, hold, call the provider (plain or streamed), settle."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from flask import Blueprint, Response, current_app

import billing
import providers
import routes
import tokens
import validation
import vision
from config import ModelConfig, UpstreamConfig
from routes.relay import Relay

bp = Blueprint("chat", __name__)


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    req = validation.text_request("chat", routes.json_body())
    return handle(routes.ticket("chat.completions"), req, current_app.config["GATEWAY"].server.heartbeat_seconds)


@bp.post("/v1/completions")
def completions() -> Response:
    req = validation.text_request("completions", routes.json_body())
    return handle(routes.ticket("completions"), req, current_app.config["GATEWAY"].server.heartbeat_seconds)


def handle(ticket: billing.Ticket, req: validation.TextRequest, heartbeat: float) -> Response:
    """Run one chat or legacy completion request end to end; the ticket is settled on every path."""
    route, body = req.route, req.body
    model, upstream = routes.resolve(ticket, req.model, "chat")
    # Images are checked and priced before the hold (a refused image costs nothing) and fetched after it.
    images = vision.plan(ticket.cfg, model, upstream, body, ticket.key.id) if route == "chat" else None
    extra_hold = images.extra_hold if images else 0
    if route == "chat":
        prompt_tokens = tokens.chat_prompt(body)
        exact_prompt = partial(tokens.chat_prompt, body, True)
    else:
        prompt_tokens = tokens.completion_prompt(body.get("prompt"))
        exact_prompt = partial(tokens.completion_prompt, body.get("prompt"), True)
    # One cap: the smaller of the client's, sent upstream in the one field the upstream reads, as held.
    out_cap = ticket.hold_tokens(model, prompt_tokens, exact_prompt, req.mult, req.client_cap, extra_hold)
    headers = {}
    provider = providers.for_upstream(upstream)
    with ticket.settled_on_error(), vision.holding(images):
        if images:
            body = images.apply(ticket)  # fetches; bridge descriptions, inlined data URLs; charges the bridge calls
            headers = images.headers()
        up_body = dict(body)
        up_body["model"] = model.upstream_model
        up_body.pop("max_tokens", None)
        up_body.pop("max_completion_tokens", None)
        up_body[upstream.max_tokens_field if route == "chat" else "max_tokens"] = out_cap
        if not req.stream:
            return _plain(ticket, model, upstream, route, up_body, exact_prompt, headers)
        stream = provider.chat_stream(upstream, route, up_body)
    relay = Relay(ticket, model, upstream, stream, exact_prompt, req.client_usage, heartbeat)
    return Response(relay.run(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})


def _plain(ticket: billing.Ticket, model: ModelConfig, upstream: UpstreamConfig, route: str, up_body: dict,
           exact_prompt: Callable[[], int], headers: dict[str, str]) -> Response:
    result = providers.for_upstream(upstream).chat(upstream, route, up_body)
    doc = result.doc
    usage = billing.read_usage(result.usage_report)
    estimated = usage is None
    if usage is None:  # none reported, or not believable: count what is delivered
        usage = billing.Usage(exact_prompt(), sum(tokens.count(text) for text in result.texts))
        doc["usage"] = billing.usage_doc(usage)
    ticket.add_usage(model, usage, 200, estimated=estimated)
    charged = ticket.settle(200)
    return Response(billing.dumps_with_cost(doc, doc["usage"], charged), mimetype="application/json",
                    headers={**ticket.credit_headers(charged), **headers})
