"""Any OpenAI-compatible upstream (OpenAI, Gemini's OpenAI endpoint, vLLM, Ollama, ...): chat, completions, images.

Plain functions over plain dicts: a request body in, the upstream's OpenAI-shaped answer out. Nothing here knows
of Flask, keys or credits.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from config import UpstreamConfig
from errors import GatewayError, UpstreamError, UpstreamTimeout
from providers.http import Reply, post, require_key, retry_after_seconds, status_error, transport_error

READ_SIZE = 65536


def parse_error(upstream: UpstreamConfig, resp: Reply) -> GatewayError:
    """The upstream's error response as the gateway's error, keeping its message, code and param."""
    message, code, param = f"HTTP {resp.status_code}", None, None
    try:
        err = resp.json()
        if isinstance(err, list) and len(err) == 1:
            err = err[0]
        err = err.get("error", err) if isinstance(err, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            code = err.get("code") if isinstance(err.get("code"), str) else None
            param = err.get("param") if isinstance(err.get("param"), str) else None
    except ValueError:
        text = resp.text.strip()
        if text:
            message = text[:500]
    return status_error(upstream, resp.status_code, message, code=code, param=param,
                        retry_after=retry_after_seconds(resp.headers.get("Retry-After")))


def _headers(upstream: UpstreamConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {require_key(upstream)}"}


def _url(upstream: UpstreamConfig, path: str) -> str:
    return f"{upstream.base_url.rstrip('/')}/{path}"


def call(upstream: UpstreamConfig, path: str, body: dict) -> dict:
    """A non-streamed call; returns the upstream's JSON object or raises a GatewayError."""
    headers = _headers(upstream)
    resp = post(upstream, _url(upstream, path), body, headers)
    try:
        if resp.status_code != 200:
            raise parse_error(upstream, resp)
        try:
            doc = json.loads(resp.content)
        except ValueError:
            raise UpstreamError(f"The upstream '{upstream.name}' sent an answer that is not JSON.") from None
        if not isinstance(doc, dict):
            raise UpstreamError(f"The upstream '{upstream.name}' sent an answer that is not a JSON object.")
        return doc
    finally:
        resp.close()


def open_stream(upstream: UpstreamConfig, path: str, body: dict) -> Reply:
    """Start a streamed call; returns the open response once the upstream has answered 200."""
    headers = {**_headers(upstream), "Accept": "text/event-stream", "Accept-Encoding": "identity"}
    resp = post(upstream, _url(upstream, path), body, headers, stream=True)
    if resp.status_code != 200:
        try:
            raise parse_error(upstream, resp)
        finally:
            resp.close()
    return resp


def iter_events(upstream: UpstreamConfig, resp: Reply) -> Iterator[bytes]:
    """The `data:` payloads of an SSE stream as they arrive, ending at `[DONE]` (not yielded).

    Reads with read1 so events arrive as sent even from upstreams that do not use chunked encoding
    (RUNTIME.md 2.2). Raises UpstreamError if the stream ends without `[DONE]`.
    """
    raw = resp.raw
    buf = b""
    while True:
        try:
            chunk = raw.read1(READ_SIZE)
        except Exception as exc:  # urllib3's ProtocolError, ReadTimeoutError, socket errors
            err = transport_error(upstream, exc)
            if isinstance(err, UpstreamTimeout):
                raise UpstreamTimeout(f"The upstream '{upstream.name}' stopped sending.") from None
            raise UpstreamError(f"The upstream '{upstream.name}' broke off the stream.") from None
        if not chunk:
            raise UpstreamError(f"The upstream '{upstream.name}' ended the stream before it was complete.")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        buf += chunk
        while True:
            end = buf.find(b"\n\n")
            if end < 0:
                break
            event, buf = buf[:end], buf[end + 2:]
            data = _event_data(event)
            if data is None:
                continue
            if data == b"[DONE]":
                return
            yield data


def _event_data(event: bytes) -> bytes | None:
    """The data of one SSE event; None for comments and events without data."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]  # the usual case, one line
    lines = [ln[5:].lstrip(b" ") if ln.startswith(b"data:") else None for ln in event.split(b"\n")]
    data = [ln for ln in lines if ln is not None]
    return b"\n".join(data) if data else None


def generate_images(upstream: UpstreamConfig, body: dict) -> dict[str, Any]:
    """OpenAI image models, relayed as they are."""
    return call(upstream, "images/generations", body)
