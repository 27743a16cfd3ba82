"""POST /v1/embeddings: validate, hold the input's worst case, call the provider, charge usage.prompt_tokens."""
from __future__ import annotations

from flask import Blueprint, Response

import billing
import providers
import routes
import tokens
import validation

bp = Blueprint("embeddings", __name__)


@bp.post("/v1/embeddings")
def create_embeddings() -> Response:
    req = validation.embeddings_request(routes.json_body())
    return handle(routes.ticket("embeddings"), req)


def handle(ticket: billing.Ticket, req: validation.EmbeddingsRequest) -> Response:
    model, upstream = routes.resolve(ticket, req.model, "embedding")
    # The most tokens the input can be (plus the token arrays' lengths) is a bound no answer can pass; embedding
    # prices are small enough that holding it costs a key little.
    worst = sum(tokens.most(t) for t in req.texts) + req.tokens
    ticket.hold_fixed(billing.token_cost(model, worst, 0), f"embeddings of this input with {model.id}",
                      "send less input")
    with ticket.settled_on_error():
        doc = providers.for_upstream(upstream).embeddings(upstream, {**req.body, "model": model.upstream_model})
        report = doc.get("usage")
        usage = billing.read_usage({"completion_tokens": 0, **report} if isinstance(report, dict) else None)
        estimated = usage is None
        if usage is None:  # none reported, or not believable: count the input
            usage = billing.Usage(sum(tokens.count(t) for t in req.texts) + req.tokens, 0)
            doc["usage"] = {"prompt_tokens": usage.prompt, "total_tokens": usage.prompt}
        ticket.add_usage(model, billing.Usage(usage.prompt, 0), 200, estimated=estimated)
        charged = ticket.settle(200)
    return Response(billing.dumps_with_cost(doc, doc["usage"], charged), mimetype="application/json",
                    headers=ticket.credit_headers(charged))
