"""POST /v1/images/generations: validate, hold n images' price, generate, charge the images returned, settle.

The upstream's provider answers OpenAI's ImagesResponse (Gemini and Imagen translated, OpenAI relayed as it is).
Some of n images failing still answers the ones that came back, charged per image; none coming back answers the
first error and costs nothing. The ticket is settled on every path.
"""
from __future__ import annotations

import json
import logging

from flask import Blueprint, Response, current_app

import providers
import routes
import validation
from billing import Ticket

log = logging.getLogger("gateway")
bp = Blueprint("images", __name__)


@bp.post("/v1/images/generations")
def images_generations() -> Response:
    req = validation.images_request(routes.json_body())
    return handle(routes.ticket("images.generations"), req)


def handle(ticket: Ticket, req: validation.ImagesRequest) -> Response:
    """Run one image request end to end and answer OpenAI's ImagesResponse with the credit headers."""
    cfg = current_app.config["GATEWAY"]
    model, upstream = routes.resolve(ticket, req.model, "image", cfg.images.default_model)
    ticket.hold_images(model, req.n)
    with ticket.settled_on_error():  # no image, no charge
        result = providers.for_upstream(upstream).images(upstream, model, req.body, req.prompt, req.n, req.size,
                                                          req.response_format)
        if result.failures:  # statuses only: a failure's text may quote the model, which may quote the prompt
            log.warning("request_id=%s model=%s got %d of %d images; the failed calls answered %s",
                        ticket.request_id, model.id, result.count, req.n,
                        ",".join(str(f.status) for f in result.failures))
        ticket.add_images(model, min(result.count, req.n))  # never charge past the hold, whatever came back
        charged = ticket.settle(200)
    return Response(json.dumps(result.doc, separators=(",", ":")), mimetype="application/json",
                    headers=ticket.credit_headers(charged))
