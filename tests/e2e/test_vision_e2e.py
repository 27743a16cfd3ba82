"""Vision end to end: gunicorn + gevent gateway, the fake OpenAI upstream, and a local image server.

Text-only models get descriptions written by the bridge model (charged and cached), vision models get the images,
upstreams that cannot fetch URLs get data URLs, and every refused image is a free 400 that reaches no upstream.
"""
from __future__ import annotations

import base64
import json
import re
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
import requests

import db
from tests.image_server import BIG_BYTES, CAT_JPG, CAT_PNG, ImageServer, make_png
from tests.vision_checks import (
    BRIDGE_COST,
    DESCRIBED,
    NANO,
    REPLY,
    TEXT_COST,
    assert_refused_for_free,
    cost,
    data_url,
    fresh_png,
    has_image_part,
    image_body,
    img,
    post,
    wait_usage,
)


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with ImageServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def no_off_box_connections(fence_log: Path) -> Iterator[None]:
    """Every gateway of this tier is behind the test fence (tests/e2e/conftest.py): none may try a connection off
    this machine, whatever image URL it was sent."""
    yield
    tried = fence_log.read_text() if fence_log.exists() else ""
    assert tried == "", f"the gateway tried to connect off this machine: {tried}"


# --- what each kind of model receives --------------------------------------------------------------------------

def test_text_only_model_gets_a_description(gateway, fake_openai, images):
    key_id, secret = gateway.create_key("1")
    sent = len(fake_openai.requests)
    r = post(gateway, secret, image_body("gpt-text", img(images.url("/cat.jpg"), "high")))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == REPLY
    assert r.headers["x-vision-images"] == "bridged=1; cached=0; inlined=0; passed=0"
    bridge, main = [q["body"] for q in fake_openai.requests[sent:]]
    # The bridge call: the vision model, the image as a data URL, a bounded answer.
    assert bridge["model"] == "gpt-4.1-mini" and bridge["max_tokens"] == 300
    image = bridge["messages"][0]["content"][1]["image_url"]["url"]
    assert image.startswith("data:image/jpeg;base64,") and base64.b64decode(image.split(",", 1)[1]) == CAT_JPG
    # The main call: the text-only model sees the description, never an image part; the rest is untouched.
    assert main["model"] == "gpt-text" and not has_image_part(main)
    assert main["messages"][0] == {"role": "system", "content": "You are terse."}
    assert main["messages"][1]["content"] == [{"type": "text", "text": "What is in this picture?"},
                                              {"type": "text", "text": DESCRIBED}]
    # Two usage rows, linked, and the credits match them exactly.
    rows = gateway.usage(key_id)
    assert [(row["model"], row["cost"]) for row in rows] == [("gpt-test", BRIDGE_COST), ("gpt-text", TEXT_COST)]
    assert rows[1]["request_id"] == r.headers["x-request-id"] and rows[1]["parent_request_id"] is None
    assert rows[0]["parent_request_id"] == rows[1]["request_id"] != rows[0]["request_id"]
    assert NANO - gateway.balance(key_id) == BRIDGE_COST + TEXT_COST == sum(row["cost"] for row in rows)
    assert Decimal(r.headers["x-credits-charged"]) * NANO == BRIDGE_COST + TEXT_COST
    assert gateway.open_holds(key_id) == 0


def test_vision_model_receives_images_as_sent(gateway, fake_openai, images, key):
    png = data_url(fresh_png())
    body = image_body("gpt-test", img(images.url("/not-fetched.png"), "low"), img(png), images.url("/x.png"))
    sent = len(fake_openai.requests)
    r = post(gateway, key[1], body)
    assert r.status_code == 200, r.text
    assert r.headers["x-vision-images"] == "bridged=0; cached=0; inlined=0; passed=3"
    [main] = [q["body"] for q in fake_openai.requests[sent:]]
    assert main["messages"] == body["messages"]  # the upstream fetches URLs itself
    assert images.counts["/not-fetched.png"] == 0 and images.counts["/x.png"] == 0  # checked, never fetched


@pytest.mark.parametrize("url, reason", [
    ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "cloud metadata endpoint"),
    ("http://10.0.0.1/a.png", "private address (10.0.0.1)"),
    ("http://192.0.0.8/a.png", "IETF protocol assignment address (192.0.0.8)"),
    ("http://168.63.129.16/machine?comp=goalstate", "cloud host endpoint (168.63.129.16)"),
    ("http://192.0.0.192/a.png", "IETF protocol assignment address"),
    ("http://[3fff::1]/a.png", "documentation address (3fff::1)"),
    ("http://100.100.100.200/latest/meta-data/", "cloud metadata endpoint"),
    ("https://[::ffff:a9fe:a9fe]/latest/", "cloud metadata endpoint 169.254.169.254 embedded"),
])
def test_upstream_that_fetches_gets_no_internal_url(gateway, fake_openai, url, reason):
    """A vision model whose upstream fetches URLs itself (a local vLLM or Ollama, say) is sent no URL the gateway
    would refuse to fetch: the same rules, checked before the hold, a free 400 naming the part."""
    err = assert_refused_for_free(gateway, fake_openai, image_body("gpt-test", img(url)), reason)
    assert err["error"]["message"].startswith("messages[1].content[1]: The image URL ")


def test_upstream_that_cannot_fetch_gets_data_urls(gateway, fake_openai, images, key):
    png = data_url(fresh_png())
    body = image_body("gemini-test", img(images.url("/cat.png"), "low"), images.url("/redirect-ok"), img(png))
    sent = len(fake_openai.requests)
    r = post(gateway, key[1], body)
    assert r.status_code == 200, r.text
    assert r.headers["x-vision-images"] == "bridged=0; cached=0; inlined=2; passed=1"
    [main] = [q["body"] for q in fake_openai.requests[sent:]]
    parts = main["messages"][1]["content"]
    assert parts[1] == {"type": "image_url", "image_url": {"url": data_url(CAT_PNG), "detail": "low"}}
    assert parts[2] == {"type": "image_url", "image_url": {"url": data_url(CAT_PNG)}}  # bare string, followed
    assert parts[3] == body["messages"][1]["content"][3]


def test_second_identical_request_hits_the_cache(gateway, fake_openai):
    key_id, secret = gateway.create_key("1")
    body = image_body("gpt-text", img(data_url(fresh_png())))
    first = post(gateway, secret, body)
    assert first.headers["x-vision-images"] == "bridged=1; cached=0; inlined=0; passed=0"
    balance = gateway.balance(key_id)
    sent = len(fake_openai.requests)
    second = post(gateway, secret, body)
    assert second.status_code == 200, second.text
    assert second.headers["x-vision-images"] == "bridged=0; cached=1; inlined=0; passed=0"
    [main] = [q["body"] for q in fake_openai.requests[sent:]]  # no bridge call
    assert main["messages"][1]["content"][1] == {"type": "text", "text": DESCRIBED}
    assert balance - gateway.balance(key_id) == TEXT_COST  # only the main call
    rows = gateway.usage(key_id)
    assert [row["model"] for row in rows] == ["gpt-test", "gpt-text", "gpt-text"]
    assert rows[2]["cost"] == TEXT_COST and rows[2]["request_id"] == second.headers["x-request-id"]


def test_same_image_twice_in_one_request_is_described_once(gateway, fake_openai):
    key_id, secret = gateway.create_key("1")
    a, b = data_url(fresh_png()), data_url(fresh_png())
    sent = len(fake_openai.requests)
    r = post(gateway, secret, image_body("gpt-text", img(a), img(b), img(a, "high")))
    assert r.headers["x-vision-images"] == "bridged=2; cached=1; inlined=0; passed=0"
    bodies = [q["body"] for q in fake_openai.requests[sent:]]
    assert len(bodies) == 3 and not has_image_part(bodies[-1])  # two bridge calls, then the main call
    assert [p["text"] for p in bodies[-1]["messages"][1]["content"][1:]] == [DESCRIBED] * 3
    assert sorted(row["cost"] for row in gateway.usage(key_id)) == [BRIDGE_COST, BRIDGE_COST, TEXT_COST]


def test_streaming_with_a_bridged_image(gateway, fake_openai):
    key_id, secret = gateway.create_key("1")
    sent = len(fake_openai.requests)
    resp = gateway.client(secret).chat.completions.with_raw_response.create(
        stream=True, stream_options={"include_usage": True},
        **image_body("gpt-text", img(data_url(fresh_png())), text="Tell me [usage=20,4]"))
    assert resp.headers["x-vision-images"] == "bridged=1; cached=0; inlined=0; passed=0"
    chunks = list(resp.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 tok3 "
    bridge, main = [q["body"] for q in fake_openai.requests[sent:]]
    assert main["stream"] is True and not has_image_part(main) and "image_url" in json.dumps(bridge)
    rows = wait_usage(gateway, key_id, 2)
    assert [(row["model"], row["cost"]) for row in rows] == [("gpt-test", BRIDGE_COST),
                                                            ("gpt-text", cost(20, 4, "0.50", "1.50"))]
    assert rows[0]["parent_request_id"] == rows[1]["request_id"]
    assert NANO - gateway.balance(key_id) == sum(row["cost"] for row in rows)
    # the usage chunk's cost is the whole request's, bridge call included, as usage.cost is for plain answers
    assert chunks[-1].usage.model_extra["cost"] == pytest.approx(sum(row["cost"] for row in rows) / NANO)


def test_bridge_cost_is_part_of_the_hold(gateway, fake_openai):
    # What a fresh image needs (its bridge call's hold, the main call's prompt, one output token), from a 402.
    _, broke = gateway.create_key("0")
    r = post(gateway, broke, image_body("gpt-text", img(data_url(fresh_png()))))
    assert r.status_code == 402
    needed = re.search(r"needs at least ([0-9]+(?:\.[0-9]+)?)", r.json()["error"]["message"]).group(1)
    key_id, secret = gateway.create_key(needed)
    cached = image_body("gpt-text", img(data_url(fresh_png())))
    r = post(gateway, secret, cached)  # exactly enough for one bridged request, which caches the description
    assert r.status_code == 200 and r.headers["x-vision-images"] == "bridged=1; cached=0; inlined=0; passed=0"
    sent = len(fake_openai.requests)
    r = post(gateway, secret, cached)  # cached: the main call's hold fits what is left
    assert r.status_code == 200 and r.headers["x-vision-images"] == "bridged=0; cached=1; inlined=0; passed=0"
    r = post(gateway, secret, image_body("gpt-text", img(data_url(fresh_png()))))
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_credits"
    assert len(fake_openai.requests) == sent + 1  # neither the bridge nor the main call was made for the last
    spent = Decimal(needed) * NANO - gateway.balance(key_id)
    assert spent == BRIDGE_COST + 2 * TEXT_COST and gateway.open_holds(key_id) == 0


def test_cache_is_per_key(gateway, fake_openai):
    """Key B learns nothing from key A's images: B's first sending is bridged and charged, as if A never had."""
    a_id, a_secret = gateway.create_key("1")
    b_id, b_secret = gateway.create_key("1")
    body = image_body("gpt-text", img(data_url(fresh_png())))
    assert post(gateway, a_secret, body).headers["x-vision-images"] == "bridged=1; cached=0; inlined=0; passed=0"
    sent = len(fake_openai.requests)
    r = post(gateway, b_secret, body)
    assert r.status_code == 200 and r.headers["x-vision-images"] == "bridged=1; cached=0; inlined=0; passed=0"
    assert len(fake_openai.requests) == sent + 2  # B's own bridge call, then the main call
    assert NANO - gateway.balance(b_id) == BRIDGE_COST + TEXT_COST
    assert [(row["model"], row["cost"]) for row in gateway.usage(b_id)] == [("gpt-test", BRIDGE_COST),
                                                                           ("gpt-text", TEXT_COST)]
    # Each key now hits its own entry.
    for secret in (a_secret, b_secret):
        assert post(gateway, secret, body).headers["x-vision-images"] == "bridged=0; cached=1; inlined=0; passed=0"
    assert NANO - gateway.balance(a_id) == BRIDGE_COST + 2 * TEXT_COST


def test_remote_image_hold_assumes_a_bridge_call(gateway, fake_openai, images):
    """A remote image is fetched only inside the hold, so the hold counts it as bridged; the unused part of the
    hold returns at settlement, also when the image turns out to be cached."""
    key_id, secret = gateway.create_key("1")
    url = images.url("/cat.png?hold-test")
    first = post(gateway, secret, image_body("gpt-text", img(url)))
    assert first.headers["x-vision-images"] == "bridged=1; cached=0; inlined=0; passed=0"
    second = post(gateway, secret, image_body("gpt-text", img(url), img(url)))
    assert second.headers["x-vision-images"] == "bridged=0; cached=2; inlined=0; passed=0"
    assert NANO - gateway.balance(key_id) == BRIDGE_COST + 2 * TEXT_COST and gateway.open_holds(key_id) == 0


def test_fetches_in_flight_are_bounded_per_worker(make_gateway, fake_openai, images):
    """Each fetch reserves max_image_bytes of a budget of 4 x max_image_bytes per worker, so however many
    requests arrive at once, at most 4 images are being downloaded by the worker; the rest wait their turn."""
    gw = make_gateway(lambda cfg: cfg["vision"].update(max_image_bytes=4096, fetch_timeout_seconds=10))
    key_id, secret = gw.create_key("1")
    images.max_in_flight = 0
    before = images.counts["/slow.png"]

    def one(i: int) -> requests.Response:
        return post(gw, secret, image_body("gemini-test", img(images.url(f"/slow.png?n={i}"))))

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(one, range(10)))
    assert [a.status_code for a in answers] == [200] * 10
    assert images.counts["/slow.png"] - before == 10
    assert 1 <= images.max_in_flight <= 4
    assert gw.open_holds(key_id) == 0 and len(gw.usage(key_id)) == 10


# --- refusals: 400, free, and no upstream call ------------------------------------------------------------------

@pytest.mark.parametrize("model", ["gpt-text", "gemini-test", "gpt-test"])
@pytest.mark.parametrize("url,reason", [
    ("http://10.0.0.1/x.png", "private address"),
    ("http://172.16.0.1/x.png", "private address"),
    ("http://192.168.1.1/x.png", "private address"),
    ("http://100.64.0.1/x.png", "carrier-grade NAT"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata endpoint"),
    ("http://169.254.1.1/x.png", "link-local"),
    ("http://0.0.0.0:80/x.png", "unspecified"),
    ("http://[fd00::1]/x.png", "private address"),
    ("http://[::ffff:169.254.169.254]/x.png", "cloud metadata endpoint 169.254.169.254 embedded"),
    ("http://192.0.0.8/x.png", "IETF protocol assignment"),
    ("http://[3fff::1]/x.png", "documentation"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("ftp://example.com/x.png", "scheme 'ftp'"),
])
def test_refused_urls_with_loopback_allowed(gateway, fake_openai, model, url, reason):
    """Refused by address or scheme before the hold, whoever would fetch: no usage row at all."""
    err = assert_refused_for_free(gateway, fake_openai, image_body(model, img(url)), reason)
    assert err["error"]["message"].startswith("messages[1].content[1]: ")


@pytest.mark.parametrize("model", ["gpt-text", "gemini-test"])
@pytest.mark.parametrize("path,reason", [
    ("/redirect-private", "private address (10.0.0.1)"),
    ("/text", "not an image"),
    ("/fake-png", "not an image"),
    ("/missing.png", "HTTP 404"),
])
def test_refused_while_fetching(gateway, fake_openai, images, model, path, reason):
    """Refused by what the fetch meets (inside the hold): free, one usage row with status 400, no hold left."""
    err = assert_refused_for_free(gateway, fake_openai, image_body(model, img(images.url(path))), reason,
                                  after_hold=True)
    assert err["error"]["message"].startswith("messages[1].content[1]: ")


def test_vision_model_that_fetches_itself_still_refuses_other_schemes(gateway, fake_openai):
    assert_refused_for_free(gateway, fake_openai, image_body("gpt-test", img("file:///etc/passwd")), "scheme 'file'")


@pytest.mark.parametrize("model", ["gpt-text", "gemini-test", "gpt-test"])
@pytest.mark.parametrize("url,reason", [
    ("data:image/png;base64,!!not base64!!", "not valid base64"),
    ("data:text/plain;base64,aGVsbG8=", "not supported"),
    ("data:image/png;base64," + base64.b64encode(b"<html>hello</html>").decode(), "does not hold an image"),
    ("data:image/png,rawbytes", "not supported"),
    ({"detail": "high"}, "must be a non-empty string"),
])
def test_malformed_data_urls(gateway, fake_openai, model, url, reason):
    assert_refused_for_free(gateway, fake_openai, image_body(model, url if isinstance(url, dict) else img(url)),
                            reason)


@pytest.mark.parametrize("model", ["gpt-text", "gpt-test"])
def test_too_many_images(gateway, fake_openai, model):
    url = data_url(CAT_PNG)
    body = image_body(model, *[img(url)] * 11)
    assert_refused_for_free(gateway, fake_openai, body, "11 images", code="too_many_images", param="messages")


def test_size_cap_and_timeout(make_gateway, fake_openai, images):
    def small(cfg: dict) -> None:
        cfg["vision"].update(max_image_bytes=4096, fetch_timeout_seconds=1)
    gw = make_gateway(small)
    err = assert_refused_for_free(gw, fake_openai, image_body("gpt-text", img(images.url("/big.png"))),
                                  "larger than 4096 bytes", after_hold=True)
    assert images.finished["/big.png"].wait(5) and images.sent["/big.png"] < BIG_BYTES // 10  # stopped early
    assert "messages[1].content[1]" in err["error"]["message"]
    assert_refused_for_free(gw, fake_openai, image_body("gemini-test", img(images.url("/big-declared.png"))),
                            "larger than 4096 bytes", after_hold=True)
    for path in ("/hang", "/trickle.png"):
        started = time.monotonic()
        assert_refused_for_free(gw, fake_openai, image_body("gpt-text", img(images.url(path))), "within 1 s",
                                after_hold=True)
        assert time.monotonic() - started < 4
    assert_refused_for_free(gw, fake_openai, image_body("gpt-text", img(data_url(make_png(64, 64) + b"\0" * 5000))),
                            "larger than 4096 bytes")
    key_id, secret = gw.create_key("1")
    assert post(gw, secret, image_body("gemini-test", img(images.url("/cat.png")))).status_code == 200


# --- the bridge -------------------------------------------------------------------------------------------------

def test_old_shared_cache_is_migrated(tmp_path):
    """A database made by the first schema: its shared vision_cache goes, the per-key table comes, twice safely."""
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE vision_cache (image_hash TEXT NOT NULL, model TEXT NOT NULL, description TEXT NOT NULL,
                                   created_at REAL NOT NULL, PRIMARY KEY (image_hash, model));
        INSERT INTO vision_cache VALUES ('abc', 'gpt-test', 'a cat', 0);""")
    conn.close()
    for _ in range(2):
        db.init(path)
    conn = sqlite3.connect(path)
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "vision_cache" not in tables and "vision_descriptions" in tables
        columns = [row[1] for row in conn.execute("PRAGMA table_info(vision_descriptions)")]
        assert columns == ["key_id", "image_hash", "model", "description", "created_at"]
    finally:
        conn.close()
