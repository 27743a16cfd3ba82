"""Vision under changed [vision] settings, in process: what the app answers when it accepts 40 images, refuses
loopback hosts, keeps a one-entry cache, has a dead bridge or none. Moved from tests/e2e/test_vision_e2e.py with
the same assertions: each case needed a gunicorn start-up of its own only for its config, and none of them needs a
server (no concurrency, no stream past its first event, no worker). Fetches go over real sockets to the local image
server, behind the same test fence as the e2e gateways (tests/netguard.py, here in this process)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conformance.validate import validate
from tests.conftest import Raw
from tests.image_server import CAT_PNG, ImageServer
from tests.netguard import guard_sockets
from tests.vision_checks import NANO, assert_refused_for_free, data_url, fresh_png, image_body, img, post


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with ImageServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def no_off_box_connections() -> Iterator[None]:
    """The app runs in this process: the fence is on this process's sockets for the test, and none may be tried."""
    with guard_sockets() as tried:
        yield
    assert tried == [], f"the gateway tried to connect off this machine: {tried}"


@pytest.fixture(scope="module")
def forty_images(gateway_config, upstream_keys):
    """An app that accepts 40 images a request, shared by both models' cases (each with its own key)."""
    from tests.inproc.conftest import InProcGateway
    tmp, cfg = gateway_config()
    cfg["vision"].update(max_images=40)
    return InProcGateway(tmp, cfg)


@pytest.mark.parametrize("model", ["gpt-text", "gemini-test"])
def test_key_that_cannot_pay_downloads_nothing(forty_images, fake_openai, images, model):
    """The issue's case: a 0-credit key sent 40 large image URLs and the gateway fetched them all before its 402.
    Now the 402 comes before any fetch: not one request reaches the image server."""
    gw = forty_images
    key_id, secret = gw.create_key("0")
    before = sum(images.counts.values())
    sent = len(fake_openai.requests)
    body = image_body(model, *[img(images.url(f"/big-declared.png?n={i}")) for i in range(40)])
    r = post(gw, secret, body)
    assert r.status_code == 402, r.text
    assert r.json()["error"]["code"] == "insufficient_credits"
    assert sum(images.counts.values()) == before and len(fake_openai.requests) == sent
    assert gw.balance(key_id) == 0 and gw.usage(key_id) == [] and gw.open_holds(key_id) == 0


def test_loopback_refused_when_the_switch_is_off(make_gateway, fake_openai, images):
    gw = make_gateway(lambda cfg: cfg["vision"].update(allow_loopback_image_hosts=False))
    before = sum(images.counts.values())
    for model in ("gpt-text", "gemini-test"):
        for host, reason in [("127.0.0.1", "loopback"), ("localhost", "loopback"), ("[::1]", "loopback"),
                             ("[::ffff:127.0.0.1]", "loopback")]:
            assert_refused_for_free(gw, fake_openai, image_body(model, img(images.url("/cat.png", host))), reason)
        assert_refused_for_free(gw, fake_openai, image_body(model, img("http://192.168.1.1/x.png")), "private")
    assert sum(images.counts.values()) == before  # not one connection reached the image server
    # Data URLs need no fetch and still work.
    key_id, secret = gw.create_key("1")
    assert post(gw, secret, image_body("gpt-text", img(data_url(CAT_PNG)))).status_code == 200


def test_cache_is_bounded(make_gateway, fake_openai):
    gw = make_gateway(lambda cfg: cfg["vision"].update(cache_max_entries=1))
    key_id, secret = gw.create_key("1")
    a, b = image_body("gpt-text", img(data_url(fresh_png()))), image_body("gpt-text", img(data_url(fresh_png())))
    seen = [post(gw, secret, body).headers["x-vision-images"].split(";")[:2] for body in (a, a, b, a)]
    assert seen == [["bridged=1", " cached=0"], ["bridged=0", " cached=1"], ["bridged=1", " cached=0"],
                    ["bridged=1", " cached=0"]]  # b pushed a out of a one-entry cache
    conn = gw.db()
    try:
        assert conn.execute("SELECT COUNT(*) FROM vision_descriptions").fetchone()[0] == 1
    finally:
        conn.close()


def test_failing_bridge_is_502_and_charges_nothing(make_gateway, fake_openai):
    def dead_bridge(cfg: dict) -> None:
        cfg["models"]["gpt-vision-dead"] = {"upstream": "dead", "input_price": Raw("1"), "output_price": Raw("1"),
                                            "vision": True}
        cfg["vision"]["bridge_model"] = "gpt-vision-dead"
    gw = make_gateway(dead_bridge)
    key_id, secret = gw.create_key("1")
    sent = len(fake_openai.requests)
    for stream in (False, True):
        r = post(gw, secret, image_body("gpt-text", img(data_url(CAT_PNG)), stream=stream))
        assert r.status_code == 502, r.text
        err = r.json()
        assert validate("ErrorResponse", err) == [] and err["error"]["code"] == "upstream_error"
        assert err["error"]["message"].startswith("vision bridge: the model 'gpt-vision-dead' could not describe")
        assert "messages[1].content[1]" in err["error"]["message"]
    assert len(fake_openai.requests) == sent  # the main call was never made
    assert gw.balance(key_id) == NANO
    assert [(row["cost"], row["status"]) for row in gw.usage(key_id)] == [(0, 502), (0, 502)]
    assert gw.open_holds(key_id) == 0


def test_text_only_model_without_a_bridge_is_400(make_gateway, fake_openai):
    gw = make_gateway(lambda cfg: cfg["vision"].pop("bridge_model"))
    err = assert_refused_for_free(gw, fake_openai, image_body("gpt-text", img(data_url(CAT_PNG))),
                                  "bridge_model", code="model_not_supported", param="model")
    assert "[vision]" in err["error"]["message"]
    key_id, secret = gw.create_key("1")
    assert post(gw, secret, image_body("gpt-test", img(data_url(CAT_PNG)))).status_code == 200
