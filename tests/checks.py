"""Checks of answers and books shared by the end-to-end and in-process tiers (the same assertions on both)."""
from __future__ import annotations

import base64
import json
import time

import requests

from tests.conformance.validate import validate


def sse_error(text: str) -> dict:
    """The error object of the error event at the end of a relayed stream."""
    events = [json.loads(line[6:]) for line in text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert events and "error" in events[-1], text[-500:]
    return events[-1]["error"]


def assert_free(gw, key_id: int, funded: int, status: int) -> None:
    """A failed call costs nothing: balance as funded, no hold left, one free usage row, no charge in the ledger."""
    assert gw.balance(key_id) == funded
    assert gw.open_holds(key_id) == 0
    rows = gw.usage(key_id)
    assert rows and rows[-1]["status"] == status and rows[-1]["cost"] == 0
    conn = gw.db()
    try:
        charged = conn.execute("SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE key_id = ? AND kind = 'charge'",
                               (key_id,)).fetchone()[0]
    finally:
        conn.close()
    assert charged == 0


def images(resp: requests.Response, count: int) -> dict:
    """A 200 ImagesResponse with `count` images, checked against OpenAI's schema."""
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert validate("ImagesResponse", doc) == []
    assert isinstance(doc["created"], int) and abs(doc["created"] - time.time()) < 60
    assert len(doc["data"]) == count
    return doc


def image_error(resp: requests.Response, status: int, code: str, param: str | None = None) -> dict:
    """The OpenAI-shaped error body, checked against the ErrorResponse schema; code and param exactly."""
    assert resp.status_code == status, resp.text
    doc = resp.json()
    assert validate("ErrorResponse", doc) == []
    err = doc["error"]
    assert err["code"] == code
    assert err["param"] == param
    return err


def gemini_calls(fake, word: str) -> list[tuple[str, dict, dict]]:
    """The fake Gemini's record of calls whose prompt mentions `word`: (path, headers, body)."""
    def prompt(body: dict) -> str:
        if "instances" in body:
            return body["instances"][0]["prompt"]
        return body["contents"][0]["parts"][0]["text"]
    return [r for r in fake.requests if isinstance(r[2], dict) and word in prompt(r[2])]


def audio(resp: requests.Response) -> tuple[dict, bytes]:
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    return doc, base64.b64decode(doc["data"][0]["b64_audio"])


def music_error(resp: requests.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The OpenAI-shaped error body, checked against the ErrorResponse schema; a param given must be named in
    the message too."""
    assert resp.status_code == status, resp.text
    doc = resp.json()
    assert validate("ErrorResponse", doc) == []
    err = doc["error"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param and param in err["message"]
    return err
