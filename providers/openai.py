"""Any OpenAI-compatible upstream (OpenAI, Gemini's OpenAI endpoint, vLLM, Ollama, ...): chat, completions, images.

Plain functions over plain dicts: a request body in, the upstream's OpenAI-shaped answer out. Nothing here knows
of Flask, keys or credits.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from config import UpstreamConfig
from errors import GatewayError, UpstreamError, UpstreamTimeoutError
from providers.http import (
    READ_SIZE,
    Reply,
    deadline,
    post,
    require_key,
    retry_after_seconds,
    scrub,
    status_error,
    transport_error,
)


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
        text = resp.content[:8192].decode("utf-8", "replace").strip()
        if text:
            message = text  # status_error scrubs and shortens it
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
            resp.load(upstream)
            raise parse_error(upstream, resp)
        finally:
            resp.close()
    return resp


class SSEParser:
    """An incremental server-sent-events parser: feed() each read's bytes, get back the data of each event it ended.

    Lines may end in LF, CRLF or CR (the SSE spec allows all three; sse-starlette, used by llama-cpp-python's
    server, sends CRLF), also when a read ends between a CR and its LF. Each byte is looked at once, and an
    event is capped at max_event_bytes, so an upstream that never ends its event cannot make the gateway buffer
    or rescan without bound.
    """

    def __init__(self, upstream_name: str, max_event_bytes: int) -> None:
        self.name = upstream_name
        self.max_event_bytes = max_event_bytes
        self._line = bytearray()  # the unfinished last line
        self._data: list[bytes] = []  # the current event's data lines
        self._size = 0  # bytes in self._data
        self._skip_lf = False  # the last read ended in CR: an LF starting the next one ends no further line

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of each event completed by this chunk (comments and data-less events are left out)."""
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        events: list[bytes] = []
        if len(lines) > 1:
            if self._line:
                self._line += lines[0]
                lines[0] = bytes(self._line)
                self._line = bytearray()
            for line in lines[:-1]:
                self._take(line, events)
        self._line += lines[-1]
        if self._size + len(self._line) > self.max_event_bytes:
            raise UpstreamError(f"The upstream '{self.name}' sent a stream event larger than "
                                f"{self.max_event_bytes} bytes.")
        return events

    def _take(self, line: bytes, events: list[bytes]) -> None:
        if not line:  # a blank line ends the event
            if self._data:
                data = b"\n".join(self._data)
                self._data, self._size = [], 0
                if data:
                    events.append(data)
            return
        if line.startswith(b"data"):
            if line.startswith(b"data:"):
                value = line[6:] if line[5:6] == b" " else line[5:]
            elif line == b"data":
                value = b""
            else:
                return  # a field such as "dataset:" is not data
            self._size += len(value) + 1
            if self._size > self.max_event_bytes:
                raise UpstreamError(f"The upstream '{self.name}' sent a stream event larger than "
                                    f"{self.max_event_bytes} bytes.")
            self._data.append(value)
        # Comments (":...") and other fields (event:, id:, retry:) carry nothing the relay uses.


def iter_events(upstream: UpstreamConfig, resp: Reply) -> Iterator[bytes]:
    """The `data:` payloads of an SSE stream as they arrive, ending at `[DONE]` (not yielded).

    Reads with read1 so events arrive as sent even from upstreams that do not use chunked encoding.
    The first byte must come by the call's deadline (504); after that only timeout_seconds per read applies,
    so a long healthy stream is never cut. An error event's message is scrubbed of credentials here, before
    the relay copies it to the client. Raises UpstreamError if the stream ends without `[DONE]`.
    """
    raw = resp.raw
    parser = SSEParser(upstream.name, upstream.max_event_bytes)
    first = True
    while True:
        try:
            if first:
                with deadline(upstream, resp.deadline):
                    chunk = raw.read1(READ_SIZE)
                first = False
            else:
                chunk = raw.read1(READ_SIZE)
        except GatewayError:
            raise
        except Exception as exc:  # urllib3's ProtocolError, ReadTimeoutError, socket errors
            err = transport_error(upstream, exc)
            if isinstance(err, UpstreamTimeoutError):
                raise UpstreamTimeoutError(f"The upstream '{upstream.name}' stopped sending.") from None
            raise UpstreamError(f"The upstream '{upstream.name}' broke off the stream.") from None
        if not chunk:
            raise UpstreamError(f"The upstream '{upstream.name}' ended the stream before it was complete.")
        for data in parser.feed(chunk):
            if data == b"[DONE]":
                return
            if b'"error"' in data:
                data = scrub_error_event(upstream, data)
            yield data


def scrub_error_event(upstream: UpstreamConfig, data: bytes) -> bytes:
    """An event carrying {"error": ...} with its text scrubbed and shortened; any other event unchanged."""
    try:
        obj = json.loads(data)
    except ValueError:
        return data
    if not isinstance(obj, dict) or obj.get("error") is None:
        return data
    err = obj["error"]
    if isinstance(err, dict):
        obj["error"] = {k: scrub(v, upstream) if isinstance(v, str) else v for k, v in err.items()
                        if isinstance(v, (str, int, float, bool)) or v is None}
    else:
        obj["error"] = {"message": scrub(err, upstream)}
    return json.dumps(obj, separators=(",", ":")).encode()


def generate_images(upstream: UpstreamConfig, body: dict) -> dict[str, Any]:
    """OpenAI image models, relayed as they are."""
    return call(upstream, "images/generations", body)
