"""POST /v1/moderations: relayed; free unless the model has an input price, authenticated, limited and logged."""
from __future__ import annotations

from flask import Blueprint, Response

import billing
import providers
import routes
import tokens
import validation

bp = Blueprint("moderations", __name__)
DEFAULT_MODEL = "omni-moderation-latest"  # OpenAI's default when a request names none


@bp.post("/v1/moderations")
def create_moderation() -> Response:
    req = validation.moderation_request(routes.json_body())
    return handle(routes.ticket("moderations"), req)


def handle(ticket: billing.Ticket, req: validation.ModerationRequest) -> Response:
    model, upstream = routes.resolve(ticket, req.model, "moderation", DEFAULT_MODEL)
    worst = sum(tokens.most(t) for t in req.texts)
    ticket.hold_fixed(billing.token_cost(model, worst, 0), f"moderating this input with {model.id}",
                      "send less input")
    with ticket.settled_on_error():
        doc = providers.for_upstream(upstream).moderations(upstream, {**req.body, "model": model.upstream_model})
        if billing.token_priced(model):
            # Moderation answers report no usage: the input's text is counted (images are not priced).
            ticket.add_usage(model, billing.Usage(sum(tokens.count(t) for t in req.texts), 0), 200, estimated=True)
        else:
            ticket.add(0, 200)
        charged = ticket.settle(200)
    return Response(billing.dumps_with_cost(doc, None, charged), mimetype="application/json",
                    headers=ticket.credit_headers(charged))
