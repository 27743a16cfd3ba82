"""providers/gemini.py: the pure translation functions, then generate_images against the fake Gemini server."""
from __future__ import annotations

import base64
import os
import struct
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from config import ModelConfig, UpstreamConfig
from errors import (
    BadRequestError,
    ContentPolicyError,
    ModelNotFoundError,
    RateLimitError,
    UpstreamError,
    UpstreamTimeoutError,
)
from providers import gemini
from tests.fake_gemini import FakeGemini, png_for

KEY = "test-key-AIzaSy-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]


# Pure functions

@pytest.mark.parametrize("size, gemini_ratio, imagen_ratio", [
    ("1024x1024", "1:1", "1:1"),
    ("512x512", "1:1", "1:1"),
    ("256x256", "1:1", "1:1"),
    ("1536x1024", "3:2", "4:3"),
    ("1024x1536", "2:3", "3:4"),
    ("1792x1024", "16:9", "16:9"),
    ("1024x1792", "9:16", "9:16"),
    ("auto", "1:1", "1:1"),
    ("2560x1080", "21:9", "16:9"),
    ("1024x1280", "4:5", "3:4"),
    ("1x1000", "9:16", "9:16"),
    # Nearer 1:1 than 3:4 / 4:3 in log space (a linear comparison would pick 3:4 for the first).
    ("870x1000", "4:5", "1:1"),
    ("1000x870", "5:4", "1:1"),
])
def test_aspect_ratio_picks_the_nearest_supported_ratio(size, gemini_ratio, imagen_ratio):
    assert gemini.aspect_ratio(size, "gemini") == gemini_ratio
    assert gemini.aspect_ratio(size, "imagen") == imagen_ratio


@pytest.mark.parametrize("size", ["big", "0x5", "5x0", "1024", "1024x", "x1024", "-1x5", "1024X1024",
                                  " 1024x1024", "1.5x1", "", "9999999x1", None, 1024])
def test_aspect_ratio_rejects_other_sizes(size):
    with pytest.raises(BadRequestError) as caught:
        gemini.aspect_ratio(size, "gemini")
    assert caught.value.param == "size"
    assert caught.value.code == "invalid_size"
    assert caught.value.status == 400
    assert caught.value.message.startswith('size must be "auto" or WIDTHxHEIGHT')


def test_family():
    assert gemini.family("imagen-4.0-generate-001") == "imagen"
    assert gemini.family("gemini-2.5-flash-image") == "gemini"
    assert gemini.family("my-imagen") == "gemini"


def test_request_bodies():
    assert gemini.generate_content_body("a cat", "16:9") == {
        "contents": [{"role": "user", "parts": [{"text": "a cat"}]}],
        "generationConfig": {"responseModalities": ["TEXT", "IMAGE"], "imageConfig": {"aspectRatio": "16:9"}}}
    assert gemini.predict_body("a cat", 3, "4:3") == {
        "instances": [{"prompt": "a cat"}],
        "parameters": {"sampleCount": 3, "aspectRatio": "4:3", "includeRaiReason": True}}


def _answer(parts, finish="STOP"):
    return {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}]}


def test_parse_generate_content_takes_images_and_text_and_skips_thoughts():
    doc = _answer([{"text": "draft idea", "thought": True},
                   {"inlineData": {"mimeType": "image/png", "data": "DRAFT"}, "thought": True},
                   {"text": "Here is "},
                   {"inlineData": {"mimeType": "image/jpeg", "data": "FINAL"}},
                   {"inlineData": {"mimeType": "application/pdf", "data": "NOTIMAGE"}},
                   {"text": "a cat."}])
    assert gemini.parse_generate_content(doc) == ([{"b64_json": "FINAL", "mime_type": "image/jpeg"}],
                                                  "Here is\na cat.")
    image_only = _answer([{"inlineData": {"mimeType": "image/png", "data": "X"}}])
    assert gemini.parse_generate_content(image_only) == ([{"b64_json": "X", "mime_type": "image/png"}], None)


def test_parse_generate_content_keeps_an_image_despite_a_safety_finish():
    doc = _answer([{"inlineData": {"mimeType": "image/png", "data": "X"}}], finish="SAFETY")
    assert gemini.parse_generate_content(doc)[0] == [{"b64_json": "X", "mime_type": "image/png"}]


@pytest.mark.parametrize("reason", sorted(gemini.BLOCKED_REASONS))
def test_parse_generate_content_blocked_finish_is_content_policy(reason):
    with pytest.raises(ContentPolicyError) as caught:
        gemini.parse_generate_content({"candidates": [{"finishReason": reason, "index": 0}]})
    assert caught.value.message == f"The image request was blocked by the upstream's safety filter ({reason})."
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, "content_policy_violation",
                                                                           "prompt")


def test_parse_generate_content_prompt_feedback_is_content_policy():
    with pytest.raises(ContentPolicyError) as caught:
        gemini.parse_generate_content({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}})
    assert caught.value.message == ("The image request was blocked by the upstream's safety filter "
                                    "(PROHIBITED_CONTENT).")


@pytest.mark.parametrize("doc, message", [
    (_answer([{"text": "I can't draw."}], "NO_IMAGE"),
     'The upstream returned no image (finishReason NO_IMAGE): "I can\'t draw."'),
    ({"candidates": [{"finishReason": "IMAGE_OTHER"}]}, "The upstream returned no image (finishReason IMAGE_OTHER)."),
    ({}, "The upstream returned no image (no candidates)."),
    ([], "The upstream returned no image (no candidates)."),
    (_answer([]), "The upstream returned no image (finishReason STOP)."),
])
def test_parse_generate_content_without_image_is_upstream_error(doc, message):
    with pytest.raises(UpstreamError) as caught:
        gemini.parse_generate_content(doc)
    assert caught.value.message == message
    assert caught.value.status == 502


def test_parse_predict():
    doc = {"predictions": [{"bytesBase64Encoded": "A", "mimeType": "image/png"},
                           {"raiFilteredReason": "filtered."},
                           {"bytesBase64Encoded": "B"}]}
    assert gemini.parse_predict(doc) == [{"b64_json": "A", "mime_type": "image/png"},
                                         {"b64_json": "B", "mime_type": "image/png"}]
    with pytest.raises(ContentPolicyError) as caught:
        gemini.parse_predict({"predictions": [{"raiFilteredReason": "Filtered by policy."}]})
    assert caught.value.message == "The image request was blocked by the upstream's safety filter (Filtered by policy)."
    for empty in ({}, {"predictions": []}, {"predictions": [{}]}, None):
        with pytest.raises(UpstreamError, match="no predictions"):
            gemini.parse_predict(empty)


UP = UpstreamConfig(name="gemini", kind="gemini", base_url="http://x/v1beta", api_key_env="TEST_GEMINI_KEY")


def _google(code, status, message, details=None):
    import json
    error = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return json.dumps({"error": error})


def test_error_from_response_bad_key_is_502_naming_the_variable():
    body = _google(400, "INVALID_ARGUMENT", f"API key not valid: {KEY}",
                   [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}])
    for status, text in ((400, body), (401, _google(401, "UNAUTHENTICATED", KEY)),
                         (403, _google(403, "PERMISSION_DENIED", KEY))):
        error = gemini.error_from_response(UP, status, text, {})
        assert type(error) is UpstreamError and error.status == 502
        assert "refused the gateway's own API key" in error.message and "TEST_GEMINI_KEY" in error.message
        assert KEY not in error.message


def test_error_from_response_429_retry_delay():
    def rate_limited(delay, headers):
        details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}] if delay else []
        return gemini.error_from_response(UP, 429, _google(429, "RESOURCE_EXHAUSTED", "quota", details), headers)
    error = rate_limited("59s", {"Retry-After": "3"})
    assert type(error) is RateLimitError and error.status == 429 and error.headers == {"Retry-After": "59"}
    assert error.message == "The upstream 'gemini' is rate limiting the gateway: quota"
    assert rate_limited("1.5s", {}).headers == {"Retry-After": "2"}
    assert rate_limited("0.2s", {}).headers == {"Retry-After": "1"}
    assert rate_limited(None, {"retry-after": "12"}).headers == {"Retry-After": "12"}
    assert rate_limited(None, {}).headers == {}


@pytest.mark.parametrize("status, cls, code", [
    (400, BadRequestError, "invalid_request"), (404, ModelNotFoundError, "model_not_found"),
    (500, UpstreamError, "upstream_error"), (503, UpstreamError, "upstream_error"),
    (504, UpstreamTimeoutError, "upstream_timeout")])
def test_error_from_response_by_status(status, cls, code):
    error = gemini.error_from_response(UP, status, "[" + _google(status, "X", "Google says no") + "]", {})
    assert type(error) is cls and error.code == code
    assert error.status == {400: 400, 404: 404, 504: 504}.get(status, 502)
    assert "Google says no" in error.message


def test_error_from_response_non_json_body():
    error = gemini.error_from_response(UP, 429, "<html>Too many</html>", {"Retry-After": "5"})
    assert type(error) is UpstreamError
    assert error.message == "The upstream 'gemini' failed with HTTP 429 and a body that is not JSON."


# generate_images against the fake server

@pytest.fixture
def fake():
    with FakeGemini(KEY, slow_seconds=3.0) as server:
        yield server


@pytest.fixture
def upstream(fake, monkeypatch):
    monkeypatch.setenv("TEST_GEMINI_KEY", KEY)
    return UpstreamConfig(name="gemini", kind="gemini", base_url=fake.base_url, api_key_env="TEST_GEMINI_KEY",
                          timeout_seconds=2)


def model(upstream_model="gemini-2.5-flash-image"):
    return ModelConfig(id="nano-banana", upstream="gemini", upstream_model=upstream_model, mode="image",
                       per_image=Decimal("0.039"))


IMAGEN = "imagen-4.0-generate-001"


def _png_size(b64: str) -> tuple[int, int]:
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_gemini_one_image(fake, upstream):
    images, failures = gemini.generate_images(upstream, model(), "a cat", 1, "1792x1024")
    assert failures == []
    assert images == [{"b64_json": base64.b64encode(png_for("16:9")).decode(), "mime_type": "image/png",
                       "revised_prompt": "Here is your image"}]
    assert _png_size(images[0]["b64_json"]) == (64, 36)
    [(path, headers, body)] = fake.requests
    assert path == "/v1beta/models/gemini-2.5-flash-image:generateContent"  # no ?key= in the URL
    assert headers["x-goog-api-key"] == KEY
    assert headers["content-type"] == "application/json"
    assert body == gemini.generate_content_body("a cat", "16:9")


def test_gemini_without_text_has_no_revised_prompt(fake, upstream):
    images, failures = gemini.generate_images(upstream, model(), "a cat [notext]", 1, "auto")
    assert failures == [] and list(images[0]) == ["b64_json", "mime_type"]
    assert _png_size(images[0]["b64_json"]) == (4, 4)


def test_gemini_n_makes_one_call_per_image(fake, upstream):
    images, failures = gemini.generate_images(upstream, model(), "cats", 3, "1536x1024")
    assert failures == [] and len(images) == 3
    assert [_png_size(i["b64_json"]) for i in images] == [(12, 8)] * 3
    assert [(p, b["generationConfig"]["imageConfig"]["aspectRatio"]) for p, _, b in fake.requests] == [
        ("/v1beta/models/gemini-2.5-flash-image:generateContent", "3:2")] * 3


def test_imagen_n3_is_one_predict(fake, upstream):
    images, failures = gemini.generate_images(upstream, model(IMAGEN), "cats", 3, "1536x1024")
    assert failures == [] and len(images) == 3
    assert images[0] == {"b64_json": base64.b64encode(png_for("4:3")).decode(), "mime_type": "image/png"}
    [(path, headers, body)] = fake.requests
    assert path == f"/v1beta/models/{IMAGEN}:predict"
    assert headers["x-goog-api-key"] == KEY
    assert body == {"instances": [{"prompt": "cats"}],
                    "parameters": {"sampleCount": 3, "aspectRatio": "4:3", "includeRaiReason": True}}


@pytest.mark.parametrize("n, counts", [(6, [2, 4]), (9, [1, 4, 4]), (4, [4])])
def test_imagen_splits_into_predicts_of_at_most_four(fake, upstream, n, counts):
    images, failures = gemini.generate_images(upstream, model(IMAGEN), "cats", n, "1024x1792")
    assert failures == [] and len(images) == n
    assert sorted(b["parameters"]["sampleCount"] for _, _, b in fake.requests) == counts
    assert {b["parameters"]["aspectRatio"] for _, _, b in fake.requests} == {"9:16"}


@pytest.mark.parametrize("upstream_model", ["gemini-2.5-flash-image", IMAGEN])
def test_safety_is_content_policy(fake, upstream, upstream_model):
    images, failures = gemini.generate_images(upstream, model(upstream_model), "[safety]", 2, "auto")
    assert images == [] and all(type(f) is ContentPolicyError for f in failures) and failures
    reason = "IMAGE_SAFETY" if upstream_model.startswith("gemini") else "Your current safety filter"
    assert f"blocked by the upstream's safety filter ({reason}" in failures[0].message


def test_blocked_prompt_is_content_policy(fake, upstream):
    images, [failure] = gemini.generate_images(upstream, model(), "[blocked]", 1, "auto")
    assert images == [] and type(failure) is ContentPolicyError
    assert failure.message == "The image request was blocked by the upstream's safety filter (SAFETY)."


def test_no_image_is_upstream_error(fake, upstream):
    _, [failure] = gemini.generate_images(upstream, model(), "[noimage]", 1, "auto")
    assert type(failure) is UpstreamError
    assert failure.message == 'The upstream returned no image (finishReason NO_IMAGE): "I can only describe that, ' \
                              'not draw it."'


def test_wrong_key_is_upstream_error_without_the_key(fake, upstream, monkeypatch):
    wrong = "AIzaWRONG-KEY-never-shown-42"
    monkeypatch.setenv("TEST_GEMINI_KEY", wrong)
    images, [failure] = gemini.generate_images(upstream, model(), "a cat", 1, "auto")
    assert images == [] and type(failure) is UpstreamError and failure.status == 502
    assert failure.message == ("The upstream 'gemini' refused the gateway's own API key (HTTP 400 API_KEY_INVALID); "
                               "the operator must check TEST_GEMINI_KEY.")
    assert wrong not in repr(failure.body()) and fake.requests[0][1]["x-goog-api-key"] == wrong


def test_fake_refuses_a_missing_key(fake, upstream):
    import requests
    resp = requests.post(f"{fake.base_url}/models/gemini-2.5-flash-image:generateContent",
                         json=gemini.generate_content_body("a cat", "1:1"), timeout=5)
    assert resp.status_code == 403 and resp.json()["error"]["status"] == "PERMISSION_DENIED"
    error = gemini.error_from_response(upstream, resp.status_code, resp.text, resp.headers)
    assert type(error) is UpstreamError and "(HTTP 403 PERMISSION_DENIED)" in error.message


def test_fake_rejects_a_wrong_shape(fake, upstream):
    import requests
    body = gemini.generate_content_body("a cat", "1:1")
    body["generationConfig"]["responseModalities"] = ["TEXT"]
    resp = requests.post(f"{fake.base_url}/models/gemini-2.5-flash-image:generateContent", json=body,
                         headers={"x-goog-api-key": KEY}, timeout=5)
    assert resp.status_code == 400 and resp.json()["error"]["status"] == "INVALID_ARGUMENT"
    bad_ratio = gemini.predict_body("a cat", 1, "3:2")
    resp = requests.post(f"{fake.base_url}/models/{IMAGEN}:predict", json=bad_ratio,
                         headers={"x-goog-api-key": KEY}, timeout=5)
    assert resp.status_code == 400 and resp.json()["error"]["message"] == "Unsupported aspect ratio."


def test_429_is_rate_limited_with_retry_after(fake, upstream):
    _, [failure] = gemini.generate_images(upstream, model(), "[429]", 1, "auto")
    assert type(failure) is RateLimitError and failure.status == 429
    assert failure.headers == {"Retry-After": "7"}


def test_503_is_upstream_error(fake, upstream):
    _, [failure] = gemini.generate_images(upstream, model(), "[503]", 1, "auto")
    assert type(failure) is UpstreamError and failure.status == 502
    assert failure.message == ("The upstream 'gemini' failed with HTTP 503: "
                               "The model is overloaded. Please try again later.")


def test_non_json_200_is_upstream_error(fake, upstream):
    _, [failure] = gemini.generate_images(upstream, model(), "[garbage]", 1, "auto")
    assert type(failure) is UpstreamError
    assert failure.message == "The upstream 'gemini' answered HTTP 200 with a body that is not JSON."


def test_unknown_model_is_model_not_found(fake, upstream):
    _, [failure] = gemini.generate_images(upstream, model("gemini-missing"), "a cat", 1, "auto")
    assert type(failure) is ModelNotFoundError and failure.status == 404


def test_slow_upstream_is_timeout(fake, upstream):
    slow = UpstreamConfig(**{**upstream.__dict__, "timeout_seconds": 0.3})  # the fake waits 3 s: always too long
    _, [failure] = gemini.generate_images(slow, model(), "[slow]", 1, "auto")
    assert type(failure) is UpstreamTimeoutError and failure.status == 504


def test_flaky_gives_some_images_and_some_failures(fake, upstream):
    images, failures = gemini.generate_images(upstream, model(), "[flaky]", 4, "auto")
    assert len(images) == 2 and len(failures) == 2
    assert all(type(f) is UpstreamError and "HTTP 503" in f.message for f in failures)


def test_missing_key_raises_before_any_call(fake, upstream, monkeypatch):
    monkeypatch.delenv("TEST_GEMINI_KEY")
    with pytest.raises(UpstreamError) as caught:
        gemini.generate_images(upstream, model(), "a cat", 1, "auto")
    assert "TEST_GEMINI_KEY" in caught.value.message
    assert fake.requests == []


def test_bad_size_and_n_raise_before_any_call(fake, upstream):
    with pytest.raises(BadRequestError) as caught:
        gemini.generate_images(upstream, model(), "a cat", 1, "big")
    assert caught.value.param == "size"
    with pytest.raises(BadRequestError) as caught:
        gemini.generate_images(upstream, model(), "a cat", 0, "auto")
    assert caught.value.param == "n"
    assert fake.requests == []


def test_calls_overlap_when_gevent_patches_sockets():
    """As under the gunicorn gevent worker: four 0.5 s calls take about 0.5 s, not 2 s."""
    script = textwrap.dedent(f"""
        from gevent import monkey; monkey.patch_all()
        import os, time
        from config import ModelConfig, UpstreamConfig
        from providers import gemini
        from tests.fake_gemini import FakeGemini
        os.environ["TEST_GEMINI_KEY"] = {KEY!r}
        with FakeGemini({KEY!r}, slow_seconds=0.5) as fake:
            up = UpstreamConfig(name="gemini", kind="gemini", base_url=fake.base_url, api_key_env="TEST_GEMINI_KEY")
            m = ModelConfig(id="m", upstream="gemini", upstream_model="gemini-2.5-flash-image", mode="image")
            start = time.monotonic()
            images, failures = gemini.generate_images(up, m, "[slow]", 4, "auto")
            print(len(images), len(failures), round(time.monotonic() - start, 2))
    """)
    done = subprocess.run([sys.executable, "-c", script], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    count, failed, seconds = done.stdout.split()
    assert (count, failed) == ("4", "0")
    assert float(seconds) < 1.5  # one after the other they would take 2 s
