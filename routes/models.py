"""GET /v1/models, GET /v1/models/<id> and GET /health (the one route without a key or a rate limit)."""
from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, current_app, g

import policies
from config import ModelConfig
from errors import ModelNotFoundError

bp = Blueprint("models", __name__)


@bp.get("/health")
def health() -> dict:
    now = datetime.now(UTC)
    return {"status": "OK", "timestamp": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"}


def model_object(model: ModelConfig) -> dict:
    cfg = current_app.config["GATEWAY"]
    return {"id": model.id, "object": "model", "created": current_app.config["GATEWAY_STARTED"],
            "owned_by": cfg.server.owner, "mode": model.mode,
            "pricing": {"input_per_million_tokens": float(model.input_price),
                        "output_per_million_tokens": float(model.output_price),
                        "per_image": float(model.per_image), "per_second": float(model.per_second),
                        "per_minute": float(model.per_minute),
                        "per_million_characters": float(model.per_million_characters)},
            "capabilities": {"vision": model.vision, "streaming": model.mode in ("chat", "speech")},
            "max_output_tokens": model.max_output_tokens}


@bp.get("/v1/models")
def list_models() -> dict:
    # policy hook: a key with an allowed-models list sees only those
    shown = policies.visible(g.api_key, current_app.config["GATEWAY"].models.values())
    return {"object": "list", "data": [model_object(m) for m in shown]}


@bp.get("/v1/models/<path:model_id>")
def get_model(model_id: str) -> dict:
    model = current_app.config["GATEWAY"].models.get(model_id)
    if model is None or not policies.may_use(g.api_key, model_id):  # policy hook
        raise ModelNotFoundError(f"The model `{model_id}` does not exist or you do not have access to it.",
                                 param="model")
    return model_object(model)
