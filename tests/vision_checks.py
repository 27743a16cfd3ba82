"""Vision request bodies and the free-refusal check, shared by the end-to-end and in-process tiers."""
from __future__ import annotations

import base64
import itertools
import json
import time
from decimal import ROUND_CEILING, Decimal

import requests

from tests.conformance.validate import validate
from tests.image_server import make_png

NANO = 10**9
REPLY = "Hello from the fake upstream!"
DESCRIBED = f"[Description of an image: {REPLY}]"
_sizes = itertools.count(3)


def cost(p: int, c: int, inp: str, out: str) -> int:
    """Expected nano-credits, computed independently of billing.py (prices per million tokens)."""
    exact = (Decimal(p) * Decimal(inp) + Decimal(c) * Decimal(out)) / Decimal(10**6) * NANO
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


BRIDGE_COST = cost(11, 7, "0.40", "1.60")  # gpt-test, the bridge model; the fake reports 11 + 7 tokens
TEXT_COST = cost(11, 7, "0.50", "1.50")  # gpt-text, the main call


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def fresh_png() -> bytes:
    """A PNG no earlier test sent, so the session-wide description cache has not seen it."""
    n = next(_sizes)
    return make_png(n, n)


def image_body(model: str, *urls: object, text: str = "What is in this picture?", **extra: object) -> dict:
    parts: list[dict] = [{"type": "text", "text": text}]
    for url in urls:
        parts.append({"type": "image_url", "image_url": url if isinstance(url, (str, dict)) else str(url)})
    return {"model": model, "messages": [{"role": "system", "content": "You are terse."},
                                         {"role": "user", "content": parts}], **extra}


def img(url: str, detail: str | None = None) -> dict:
    return {"url": url, **({"detail": detail} if detail else {})}


def post(gw, secret: str, body: dict) -> requests.Response:
    """A chat request over HTTP to a gunicorn gateway, or through the WSGI app of an in-process one (its .http)."""
    http = getattr(gw, "http", requests)
    return http.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                     json=body, timeout=30)


def wait_usage(gw, key_id: int, rows: int) -> list:
    """Usage rows once settlement wrote them (a stream settles just after its last event)."""
    deadline = time.monotonic() + 5
    while len(found := gw.usage(key_id)) < rows and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def has_image_part(body: dict) -> bool:
    return "image_url" in json.dumps(body["messages"])


def assert_refused_for_free(gw, fake_openai, body: dict, reason: str, code: str = "invalid_image_url",
                            param: str = "messages[1].content[1]", after_hold: bool = False) -> dict:
    """A 400 that costs nothing and reaches no upstream. Refused before the hold: no usage row at all; refused
    while fetching (inside the hold): one free usage row with status 400. Either way no hold is left open."""
    key_id, secret = gw.create_key("1")
    sent = len(fake_openai.requests)
    r = post(gw, secret, body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert validate("ErrorResponse", err) == []
    assert err["error"]["code"] == code and err["error"]["param"] == param, err
    assert reason in err["error"]["message"], err
    assert gw.balance(key_id) == NANO and gw.open_holds(key_id) == 0
    rows = [(row["cost"], row["status"], row["uncollected"]) for row in gw.usage(key_id)]
    assert rows == ([(0, 400, 0)] if after_hold else [])
    assert gw.ledger(key_id, "kind", "amount") == [("grant", NANO)] + ([("charge", 0)] if after_hold else [])
    assert len(fake_openai.requests) == sent  # no upstream saw it, not even the bridge
    return err
