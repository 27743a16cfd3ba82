"""POST /v1/images/generations end to end: the real gunicorn + gevent gateway, the fake Gemini and OpenAI upstreams,
the official openai SDK and raw HTTP as a user."""
from __future__ import annotations

import base64
import os
import re
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.checks import gemini_calls, images
from tests.checks import image_error as error
from tests.conformance.validate import validate
from tests.conftest import GEMINI_KEY, ROOT, UPSTREAM_KEY

FLASH = 39_000_000    # gemini-2.5-flash-image: per_image 0.039 credits, in nano-credits
IMAGEN = 40_000_000   # imagen-4.0-generate-001: 0.04
GPT_IMAGE = 42_000_000  # gpt-image-1: 0.042
TEN = 10_000_000_000  # the `key` fixture's opening balance
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tag() -> str:
    """A unique word, so a test finds its own calls among those the shared fakes recorded."""
    return uuid.uuid4().hex[:12]


def post(gw, secret: str, body: dict, timeout: float = 30) -> requests.Response:
    """A raw request; whatever the gateway answers must never carry an upstream key."""
    resp = requests.post(f"{gw.base_url}/images/generations", json=body, timeout=timeout,
                         headers={"Authorization": f"Bearer {secret}"})
    for secret_key in (GEMINI_KEY, UPSTREAM_KEY):
        assert secret_key not in resp.text and secret_key not in str(resp.headers)
    return resp


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature and IHDR chunk."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def openai_calls(fake, word: str) -> list[dict]:
    return [r for r in fake.requests if r["path"].endswith("/images/generations") and word in r["body"]["prompt"]]


def one_row(gw, key_id: int) -> dict:
    (row,) = gw.usage(key_id)
    return dict(row)


# Success: Gemini image models, Imagen, OpenAI image models

def test_default_model_with_the_sdk_is_a_png_charged_one_image(gateway, key, fake_gemini):
    key_id, secret = key
    word = tag()
    raw = gateway.client(secret).images.with_raw_response.generate(prompt=f"a red fox {word}")
    result = raw.parse()
    assert len(result.data) == 1
    assert png_size(base64.b64decode(result.data[0].b64_json)) == (4, 4)  # 1:1, 4 px per ratio unit
    assert result.data[0].revised_prompt == "Here is your image"
    assert result.data[0].url is None
    assert validate("ImagesResponse", raw.http_response.json()) == []
    assert raw.headers["x-credits-charged"] == "0.039"
    assert raw.headers["x-credits-remaining"] == "9.961"
    assert gateway.balance(key_id) == TEN - FLASH
    row = one_row(gateway, key_id)
    assert (row["route"], row["model"], row["cost"], row["units"], row["status"]) == (
        "images.generations", "gemini-2.5-flash-image", FLASH, 1, 200)
    (path, headers, body) = gemini_calls(fake_gemini, word)[0]
    assert path == "/v1beta/models/gemini-2.5-flash-image:generateContent"
    assert headers["x-goog-api-key"] == GEMINI_KEY
    assert body["generationConfig"]["imageConfig"] == {"aspectRatio": "1:1"}


def test_named_gemini_model_n2_size_maps_to_3_2(gateway, key, fake_gemini):
    key_id, secret = key
    word = tag()
    result = gateway.client(secret).images.generate(model="gemini-2.5-flash-image", prompt=f"[notext] {word}",
                                                    n=2, size="1536x1024", response_format="b64_json")
    assert [png_size(base64.b64decode(d.b64_json)) for d in result.data] == [(12, 8), (12, 8)]
    assert [d.revised_prompt for d in result.data] == [None, None]  # [notext]: the model wrote nothing
    calls = gemini_calls(fake_gemini, word)
    assert len(calls) == 2  # one image per generateContent call
    assert {c[2]["generationConfig"]["imageConfig"]["aspectRatio"] for c in calls} == {"3:2"}
    assert gateway.balance(key_id) == TEN - 2 * FLASH


def test_raw_http_without_model_answers_exact_json(gateway, key):
    key_id, secret = key
    resp = post(gateway, secret, {"prompt": "[notext] a plain square"})
    doc = images(resp, 1)
    assert set(doc) == {"created", "data"}
    assert set(doc["data"][0]) == {"b64_json"}
    assert png_size(base64.b64decode(doc["data"][0]["b64_json"])) == (4, 4)
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["x-credits-charged"] == "0.039"
    assert resp.headers["x-request-id"].startswith("req_")


def test_url_is_a_png_data_url(gateway, key):
    key_id, secret = key
    resp = post(gateway, secret, {"model": "gemini-2.5-flash-image", "prompt": "a bird", "response_format": "url",
                                  "size": "1024x1792"})
    doc = images(resp, 1)
    assert set(doc["data"][0]) == {"url", "revised_prompt"}
    url = doc["data"][0]["url"]
    assert url.startswith("data:image/png;base64,")
    assert png_size(base64.b64decode(url.removeprefix("data:image/png;base64,"))) == (36, 64)  # 9:16
    assert gateway.balance(key_id) == TEN - FLASH


def test_url_with_the_sdk(gateway, key):
    result = gateway.client(key[1]).images.generate(prompt="[notext] x", response_format="url")
    assert result.data[0].b64_json is None
    assert result.data[0].url.startswith("data:image/png;base64,iVBORw0KGgo")


def test_imagen_n3_is_one_predict_call(gateway, key, fake_gemini):
    key_id, secret = key
    word = tag()
    raw = gateway.client(secret).images.with_raw_response.generate(
        model="imagen-4.0-generate-001", prompt=f"a lighthouse {word}", n=3, size="1792x1024")
    result = raw.parse()
    assert [png_size(base64.b64decode(d.b64_json)) for d in result.data] == [(64, 36)] * 3  # 16:9
    assert [d.revised_prompt for d in result.data] == [None] * 3
    ((path, headers, body),) = gemini_calls(fake_gemini, word)
    assert path == "/v1beta/models/imagen-4.0-generate-001:predict"
    assert headers["x-goog-api-key"] == GEMINI_KEY
    assert body["parameters"]["sampleCount"] == 3
    assert body["parameters"]["aspectRatio"] == "16:9"
    assert raw.headers["x-credits-charged"] == "0.12"
    assert gateway.balance(key_id) == TEN - 3 * IMAGEN
    assert one_row(gateway, key_id)["units"] == 3


def test_imagen_n6_is_two_predict_calls(gateway, key, fake_gemini):
    key_id, secret = key
    word = tag()
    doc = images(post(gateway, secret, {"model": "imagen-4.0-generate-001", "prompt": word, "n": 6}), 6)
    assert sorted(c[2]["parameters"]["sampleCount"] for c in gemini_calls(fake_gemini, word)) == [2, 4]
    assert len(doc["data"]) == 6
    assert gateway.balance(key_id) == TEN - 6 * IMAGEN


def test_openai_image_model_is_relayed(gateway, key, fake_openai):
    key_id, secret = key
    word = tag()
    raw = gateway.client(secret).images.with_raw_response.generate(
        model="gpt-image-1", prompt=f"a teapot {word}", n=2, size="1024x1536", quality="high",
        extra_body={"background": "opaque"})
    result = raw.parse()
    assert len(result.data) == 2
    assert all(png_size(base64.b64decode(d.b64_json)) == (1, 1) for d in result.data)
    ((call),) = openai_calls(fake_openai, word)
    assert call["body"] == {"model": "gpt-image-1", "prompt": f"a teapot {word}", "n": 2, "size": "1024x1536",
                            "quality": "high", "background": "opaque"}
    assert call["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert validate("ImagesResponse", raw.http_response.json()) == []
    assert raw.headers["x-credits-charged"] == "0.084"
    assert gateway.balance(key_id) == TEN - 2 * GPT_IMAGE
    row = one_row(gateway, key_id)
    assert (row["model"], row["cost"], row["units"]) == ("gpt-image-1", 2 * GPT_IMAGE, 2)


def test_openai_model_without_n_or_size_holds_and_charges_one(gateway, key, fake_openai):
    key_id, secret = key
    word = tag()
    images(post(gateway, secret, {"model": "gpt-image-1", "prompt": word, "response_format": "b64_json"}), 1)
    ((call),) = openai_calls(fake_openai, word)
    assert call["body"] == {"model": "gpt-image-1", "prompt": word, "response_format": "b64_json"}
    assert gateway.balance(key_id) == TEN - GPT_IMAGE


def test_hold_is_n_times_the_price_while_the_call_runs(gateway, key):
    key_id, secret = key
    answers: list[requests.Response] = []
    thread = threading.Thread(target=lambda: answers.append(
        post(gateway, secret, {"prompt": "[slow] [notext]", "n": 3})))
    thread.start()
    deadline = time.monotonic() + 5
    while gateway.open_holds(key_id) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    held = gateway.balance(key_id)
    thread.join()
    assert held == TEN - 3 * FLASH
    error(answers[0], 504, "upstream_timeout")  # the fake sleeps 3 s; the upstream's timeout is 2 s
    assert gateway.balance(key_id) == TEN
    assert gateway.open_holds(key_id) == 0


# Bad requests: 400 naming the field, before any credit moves or any upstream call

# Upstream failures: OpenAI-shaped, and free when no image came back

def test_partial_success_is_charged_only_for_images_returned(gateway, key, fake_gemini):
    key_id, secret = key
    word = tag()
    resp = post(gateway, secret, {"prompt": f"[flaky] [notext] {word}", "n": 4})
    doc = images(resp, 2)  # the fake fails every second [flaky] call
    assert len(gemini_calls(fake_gemini, word)) == 4
    assert all(png_size(base64.b64decode(d["b64_json"])) == (4, 4) for d in doc["data"])
    assert resp.headers["x-credits-charged"] == "0.078"
    assert gateway.balance(key_id) == TEN - 2 * FLASH
    row = one_row(gateway, key_id)
    assert (row["cost"], row["units"], row["status"]) == (2 * FLASH, 2, 200)
    assert f"request_id={resp.headers['x-request-id']} model=gemini-2.5-flash-image got 2 of 4 images; " \
           "the failed calls answered 502,502" in gateway.log()


# The upstream key: never shown (missing and refused keys: tests/inproc/test_images_errors.py)

def test_upstream_keys_never_reach_the_log(gateway, key):
    secret = key[1]
    for body in ({"prompt": "x"}, {"prompt": "[safety] x"}, {"prompt": "[429] x"}, {"prompt": "[flaky] x", "n": 2},
                 {"model": "gpt-image-1", "prompt": "x"}, {"model": "imagen-4.0-generate-001", "prompt": "x"}):
        post(gateway, secret, body)
    log = gateway.log()
    assert "route=images.generations" in log
    assert GEMINI_KEY not in log and UPSTREAM_KEY not in log


# The image examples of docs/api.md, run as a user would

def _readme_section() -> str:
    for path in (ROOT / "docs" / "api.md", Path("/tmp/readme-images.md")):
        if path.exists() and "## Images" in path.read_text():
            text = path.read_text()
            start = text.index("## Images")
            end = text.find("\n## ", start + 1)
            return text[start:end if end > 0 else None]
    pytest.skip("no section on images in docs/api.md")


def _block(section: str, lang: str) -> str:
    (code,) = re.findall(rf"```{lang}\n(.*?)```", section, re.S)
    return code


def test_readme_curl_and_sdk_examples_save_a_png(gateway, key, tmp_path):
    key_id, secret = key
    section = _readme_section()
    env = {**os.environ, "GATEWAY_KEY": secret}
    curl = _block(section, "bash").replace("http://127.0.0.1:8080/v1", gateway.base_url)
    subprocess.run(["bash", "-euo", "pipefail", "-c", curl], cwd=tmp_path, env=env, check=True, timeout=60)
    (saved,) = tmp_path.glob("*.png")
    assert png_size(saved.read_bytes()) == (12, 8)  # size 1536x1024 -> 3:2
    saved.unlink()
    python = _block(section, "python").replace("http://127.0.0.1:8080/v1", gateway.base_url)
    out = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, check=True, timeout=60,
                         capture_output=True, text=True)
    (saved,) = tmp_path.glob("*.png")
    assert png_size(saved.read_bytes()) == (12, 8)
    assert out.stdout == "Here is your image\n"
    assert gateway.balance(key_id) == TEN - 2 * FLASH
