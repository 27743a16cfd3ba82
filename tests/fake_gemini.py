"""A fake Gemini REST server on 127.0.0.1: generateContent image output and Imagen :predict
(docs/protocols.md, "Gemini image output (generateContent)" to "Gemini errors").

It checks the key and the request shape as strictly as Google does, so a wrong request fails a test.
Behaviour is picked by magic words in the prompt:

  (none)      an image plus the text part "Here is your image"
  [notext]    an image only
  [noimage]   finishReason NO_IMAGE and a text part, no image
  [safety]    finishReason IMAGE_SAFETY, no image (:predict: predictions with only raiFilteredReason)
  [blocked]   no candidates, promptFeedback.blockReason SAFETY
  [429]       429 RESOURCE_EXHAUSTED with RetryInfo retryDelay "7s"
  [503]       503 UNAVAILABLE "The model is overloaded. Please try again later."
  [flaky]     every second [flaky] call is a 503
  [slow]      sleep slow_seconds (3 s) before answering
  [garbage]   200 with a body that is not JSON
Hostile: [echo400] [echo404] [echo429] [echo500] answer that error with a message repeating the key (as the
x-goog-api-key header, as ?key=... and bare); [echo-noimage] answers no image with model text repeating it.

Model ids starting "imagen" exist only for :predict, all others only for generateContent; a model id
containing "missing" does not exist.
"""
from __future__ import annotations

import base64
import json
import re
import struct
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

GEMINI_RATIOS = {"1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"}
IMAGEN_RATIOS = {"1:1", "3:4", "4:3", "9:16", "16:9"}
_ROUTE = re.compile(r"/(v1|v1beta|v1alpha)/models/([^/:]+):(generateContent|predict)")
# Fields Google's JSON parser knows; any other name is a 400, as on the real API.
_CONTENT_FIELDS = {"contents", "systemInstruction", "generationConfig", "safetySettings", "tools", "toolConfig",
                   "cachedContent"}
_GENERATION_FIELDS = {"temperature", "topP", "topK", "candidateCount", "maxOutputTokens", "stopSequences", "seed",
                      "presencePenalty", "frequencyPenalty", "responseMimeType", "responseSchema",
                      "responseJsonSchema", "responseModalities", "imageConfig", "thinkingConfig"}
_PREDICT_PARAMETERS = {"sampleCount", "aspectRatio", "personGeneration", "sampleImageSize", "includeRaiReason",
                       "includeSafetyAttributes", "guidanceScale", "safetySetting", "language", "outputOptions"}
RAI_REASON = ("Your current safety filter threshold filtered out 1 generated images. You will not be charged for "
              "blocked images. Try rephrasing the prompt.")


def png(width: int, height: int, rgb: tuple[int, int, int] = (255, 200, 0)) -> bytes:
    """A valid PNG of one colour: signature, IHDR, one zlib IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" + bytes(rgb) * width  # filter byte 0 (none) then the pixels
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


def png_for(aspect: str) -> bytes:
    """The fake's image for an aspect ratio: 4 px per ratio unit, so 16:9 is 64x36 and tests can check the ratio."""
    width, height = (int(x) * 4 for x in aspect.split(":"))
    return png(width, height)


def google_error(code: int, status: str, message: str, details: list | None = None) -> dict:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def _bad_argument(message: str) -> tuple[int, dict]:
    return 400, google_error(400, "INVALID_ARGUMENT", message)


def _check_generate_content(body: Any) -> str | None:
    """Why Google would reject this generateContent body, or None."""
    if not isinstance(body, dict):
        return "Invalid JSON payload received. Expected an object."
    unknown = set(body) - _CONTENT_FIELDS
    if unknown:
        return f'Invalid JSON payload received. Unknown name "{min(unknown)}": Cannot find field.'
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents or not isinstance(contents[0], dict):
        return "* GenerateContentRequest.contents: contents is not specified"
    if contents[0].get("role") != "user":
        return "Please use a valid role: user, model."
    parts = contents[0].get("parts")
    text = parts[0].get("text") if isinstance(parts, list) and parts and isinstance(parts[0], dict) else None
    if not isinstance(text, str) or not text:
        return "* GenerateContentRequest.contents[0].parts: contents.parts must not be empty."
    config = body.get("generationConfig")
    if not isinstance(config, dict):
        return "Model does not support the requested response modalities: TEXT"
    unknown = set(config) - _GENERATION_FIELDS
    if unknown:
        return (f'Invalid JSON payload received. Unknown name "{min(unknown)}" at \'generation_config\': '
                "Cannot find field.")
    modalities = config.get("responseModalities")
    if not isinstance(modalities, list) or "IMAGE" not in modalities or set(modalities) - {"TEXT", "IMAGE"}:
        return "Model does not support the requested response modalities: TEXT"
    image_config = config.get("imageConfig")
    if not isinstance(image_config, dict) or image_config.get("aspectRatio") not in GEMINI_RATIOS:
        return "Request contains an invalid argument."
    return None


def _check_predict(body: Any) -> str | None:
    """Why Google would reject this :predict body, or None."""
    if not isinstance(body, dict) or set(body) - {"instances", "parameters"}:
        return "Invalid JSON payload received."
    instances = body.get("instances")
    if (not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict)
            or not isinstance(instances[0].get("prompt"), str) or not instances[0]["prompt"]):
        return "Request contains an invalid argument."
    parameters = body.get("parameters")
    if not isinstance(parameters, dict) or set(parameters) - _PREDICT_PARAMETERS:
        return "Invalid JSON payload received. Unknown name in 'parameters': Cannot find field."
    count = parameters.get("sampleCount")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 4:
        return "Number of images must be between 1 and 4."
    if parameters.get("aspectRatio") not in IMAGEN_RATIOS:
        return "Unsupported aspect ratio."
    return None


class FakeGemini:
    """The fake server: `with FakeGemini("key") as fake:` then point an upstream at fake.base_url."""

    def __init__(self, api_key: str = "fake-gemini-key", *, slow_seconds: float = 3.0) -> None:
        self.api_key = api_key
        self.slow_seconds = slow_seconds
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self._lock = threading.Lock()
        self._flaky_calls = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    def start(self) -> Self:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                status, answer = fake.handle(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out on [slow] closed its socket; that is expected

        self._server = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1beta"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def handle(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        """(status, JSON document or raw bytes) for one POST."""
        self.requests.append((path, headers, body))
        url = urlsplit(path)
        key = headers.get("x-goog-api-key") or parse_qs(url.query).get("key", [None])[0]
        if not key:
            return 403, google_error(403, "PERMISSION_DENIED", (
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API."))
        if key != self.api_key:
            message = "API key not valid. Please pass a valid API key."
            return 400, google_error(400, "INVALID_ARGUMENT", message, [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
                {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
                 "message": message}])
        route = _ROUTE.fullmatch(url.path)
        if not route:
            return 404, google_error(404, "NOT_FOUND", f"Path {url.path} was not found.")
        version, model, method = route.groups()
        if "missing" in model or (method == "predict") != model.startswith("imagen"):
            return 404, google_error(404, "NOT_FOUND", (
                f"models/{model} is not found for API version {version}, or is not supported for {method}. "
                "Call ListModels to see the list of available models and their supported methods."))
        if body is None:
            return _bad_argument("Invalid JSON payload received.")
        problem = _check_predict(body) if method == "predict" else _check_generate_content(body)
        if problem:
            return _bad_argument(problem)
        prompt = body["instances"][0]["prompt"] if method == "predict" else body["contents"][0]["parts"][0]["text"]
        failure = self._echo(prompt, headers) or self._failure(prompt)
        if failure:
            return failure
        if method == "predict":
            return 200, self._predict(prompt, body["parameters"])
        return 200, self._generate_content(model, prompt, body["generationConfig"]["imageConfig"]["aspectRatio"])

    def _echo(self, prompt: str, headers: dict[str, str]) -> tuple[int, Any] | None:
        """Errors that repeat the caller's credentials, as some proxies in front of Google do."""
        key = headers.get("x-goog-api-key", "")
        text = (f"Request rejected. x-goog-api-key: {key}; see https://proxy.invalid/v1beta?key={key} "
                f"(key {key}); headers: {json.dumps(headers)}")
        for code, status in ((400, "INVALID_ARGUMENT"), (404, "NOT_FOUND"), (429, "RESOURCE_EXHAUSTED"),
                             (500, "INTERNAL")):
            if f"[echo{code}]" in prompt:
                return code, google_error(code, status, text)
        if "[echo-noimage]" in prompt:
            return 200, {"candidates": [{"finishReason": "NO_IMAGE", "index": 0,
                                         "content": {"role": "model", "parts": [{"text": text}]}}]}
        return None

    def _failure(self, prompt: str) -> tuple[int, Any] | None:
        if "[slow]" in prompt:
            time.sleep(self.slow_seconds)
        if "[garbage]" in prompt:
            return 200, b"<html>not json</html>"
        if "[429]" in prompt:
            return 429, google_error(429, "RESOURCE_EXHAUSTED", (
                "You exceeded your current quota, please check your plan and billing details."), [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                    {"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                     "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},
                {"@type": "type.googleapis.com/google.rpc.Help", "links": [
                    {"description": "Learn more about Gemini API quotas",
                     "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}])
        flaky = False
        if "[flaky]" in prompt:
            with self._lock:
                self._flaky_calls += 1
                flaky = self._flaky_calls % 2 == 0
        if "[503]" in prompt or flaky:
            return 503, google_error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
        return None

    def _generate_content(self, model: str, prompt: str, aspect: str) -> dict:
        prompt_tokens = len(prompt.split())
        usage: dict[str, Any] = {"promptTokenCount": prompt_tokens,
                                 "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}]}
        answer: dict[str, Any] = {"usageMetadata": usage, "modelVersion": model, "responseId": uuid.uuid4().hex}
        if "[blocked]" in prompt:
            answer["promptFeedback"] = {"blockReason": "SAFETY", "safetyRatings": [
                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}]}
            usage["totalTokenCount"] = prompt_tokens
            return answer
        parts: list[dict] = []
        finish = "STOP"
        if "[safety]" in prompt:
            finish = "IMAGE_SAFETY"
        elif "[noimage]" in prompt:
            finish, parts = "NO_IMAGE", [{"text": "I can only describe that, not draw it."}]
        else:
            if "[notext]" not in prompt:
                parts.append({"text": "Here is your image"})
            parts.append({"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png_for(aspect)).decode()}})
        candidate: dict[str, Any] = {"finishReason": finish, "index": 0}
        if parts:
            candidate["content"] = {"role": "model", "parts": parts}
        answer["candidates"] = [candidate]
        image_tokens = 1290 if any("inlineData" in p for p in parts) else 0
        text_tokens = sum(len(p.get("text", "").split()) for p in parts)
        usage.update(candidatesTokenCount=image_tokens + text_tokens,
                     totalTokenCount=prompt_tokens + image_tokens + text_tokens,
                     candidatesTokensDetails=[{"modality": m, "tokenCount": c}
                                              for m, c in (("TEXT", text_tokens), ("IMAGE", image_tokens)) if c])
        return answer

    def _predict(self, prompt: str, parameters: dict) -> dict:
        count = parameters["sampleCount"]
        if "[safety]" in prompt:
            return {"predictions": [{"raiFilteredReason": RAI_REASON}] * count}
        image = base64.b64encode(png_for(parameters["aspectRatio"])).decode()
        return {"predictions": [{"bytesBase64Encoded": image, "mimeType": "image/png"}] * count}
