"""Any OpenAI-compatible upstream (OpenAI, Gemini's OpenAI endpoint, vLLM, Ollama, ...): chat, completions, images.

Implements ChatProvider and ImageProvider (providers/base.py): a request body in, the upstream's OpenAI-shaped
answer out, its SSE stream parsed into ChatEvents. Nothing here knows of Flask, keys or credits.
"""
from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from typing import Any

from config import ModelConfig, UpstreamConfig
from errors import GatewayError, UpstreamError, UpstreamTimeoutError
from providers import responses_chat
from providers.base import (
    ChatEvent,
    ChatResult,
    ImageResult,
    ResponsesEvent,
    ResponsesResult,
    SpeechResult,
    TranscriptionResult,
)
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
        return _json_object(upstream, resp.content)
    finally:
        resp.close()


def _json_object(upstream: UpstreamConfig, content: bytes) -> dict:
    """An upstream's 200 answer as a JSON object, or the 502 that says it was not one."""
    try:
        doc = json.loads(content)
    except ValueError:
        raise UpstreamError(f"The upstream '{upstream.name}' sent an answer that is not JSON.") from None
    if not isinstance(doc, dict):
        raise UpstreamError(f"The upstream '{upstream.name}' sent an answer that is not a JSON object.")
    return doc


def open_stream(upstream: UpstreamConfig, path: str, body: dict, accept: str = "text/event-stream") -> Reply:
    """Start a streamed call; returns the open response once the upstream has answered 200 (else its error)."""
    headers = {**_headers(upstream), "Accept-Encoding": "identity"}
    if accept:
        headers["Accept"] = accept
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


def iter_events(upstream: UpstreamConfig, resp: Reply, eof_ends: bool = False) -> Iterator[bytes]:
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
            if eof_ends:  # streams without [DONE] (Responses, speech): the caller knows its last event
                return
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


_PATHS = {"chat": "chat/completions", "completions": "completions"}


def check_choices(upstream: UpstreamConfig, choices: list, part: str) -> None:
    """502 for choices an SDK could not read: each an object, its message (or delta) and tool calls objects."""
    for choice in choices:
        msg = choice.get(part) if isinstance(choice, dict) else None
        calls = msg.get("tool_calls") if isinstance(msg, dict) else None
        if (not isinstance(choice, dict) or (msg is not None and not isinstance(msg, dict))
                or (calls is not None and not isinstance(calls, list))
                or any(not isinstance(c, dict) or not isinstance(c.get("function") or {}, dict)
                       for c in calls or ())):
            raise UpstreamError(f"The upstream '{upstream.name}' sent a malformed choice: each choice, its "
                                f"'{part}' and its 'tool_calls' must be JSON objects.")


def choice_text(choice: Any) -> str:
    """The text a choice (or a stream delta) carries, for counting tokens the upstream did not report."""
    if not isinstance(choice, dict):
        return ""
    if "text" in choice:
        return str(choice.get("text") or "")
    msg = choice.get("message") or choice.get("delta") or {}
    if not isinstance(msg, dict):
        return ""
    text = str(msg.get("content") or "") + str(msg.get("refusal") or "")
    calls = msg.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            text += str(fn.get("name") or "") + str(fn.get("arguments") or "")
    return text


def parse_event(upstream: UpstreamConfig, data: bytes) -> ChatEvent:
    """One stream event's data as a ChatEvent; an error event or one an SDK could not read raises.

    Every event is parsed (a few microseconds) so a malformed one ends the stream with an error event instead
    of reaching the client's SDK.
    """
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise UpstreamError(f"The upstream '{upstream.name}' sent an event that is not a JSON object.")
    if obj.get("error") is not None:
        err = obj["error"] if isinstance(obj["error"], dict) else {}
        raise UpstreamError(str(err.get("message") or "The upstream failed mid-stream."))
    choices = obj.get("choices")
    if choices is not None and not isinstance(choices, list):
        raise UpstreamError(f"The upstream '{upstream.name}' sent an event whose 'choices' is not an array.")
    check_choices(upstream, choices or [], "delta")
    texts: dict[int, str] = {}
    for choice in choices or ():
        index = choice.get("index") if isinstance(choice.get("index"), int) else 0
        text = choice_text(choice)
        if text:
            texts[index] = texts.get(index, "") + text
    return ChatEvent(data=data, doc=obj, choices=choices or [], usage_report=obj.get("usage"), texts=texts)


class _Stream:
    """An open SSE answer as ChatEvents."""

    def __init__(self, upstream: UpstreamConfig, resp: Reply) -> None:
        self.upstream, self.resp = upstream, resp

    def events(self) -> Iterator[ChatEvent]:
        for data in iter_events(self.upstream, self.resp):
            yield parse_event(self.upstream, data)

    def finish(self) -> None:
        self.resp.finish()

    def close(self) -> None:
        self.resp.close()


class OpenAIProvider:
    """Chat, legacy completions and images on any OpenAI-compatible upstream."""

    def chat(self, upstream: UpstreamConfig, route: str, body: dict) -> ChatResult:
        doc = call(upstream, _PATHS[route], body)
        choices = doc.get("choices")
        if not isinstance(choices, list):
            raise UpstreamError(f"The upstream '{upstream.name}' answered without 'choices'.")
        check_choices(upstream, choices, "message")
        return ChatResult(doc=doc, usage_report=doc.get("usage"), texts=[choice_text(c) for c in choices])

    def chat_stream(self, upstream: UpstreamConfig, route: str, body: dict) -> _Stream:
        # The usage report is always asked for: it is what the stream is charged by.
        body = {**body, "stream": True,
                "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        return _Stream(upstream, open_stream(upstream, _PATHS[route], body))

    def images(self, upstream: UpstreamConfig, model: ModelConfig, body: dict, prompt: str, n: int,
               size: str | None, response_format: str | None) -> ImageResult:
        """The upstream's answer as it came (every other field passed on untouched), and its image count."""
        doc = call(upstream, "images/generations", {**body, "model": model.upstream_model})
        if not isinstance(doc.get("data"), list):
            raise UpstreamError(f"The upstream '{upstream.name}' answered without 'data'.")
        return ImageResult(doc=doc, count=len(doc["data"]))


    # --- The Responses API: relayed to upstreams that serve it, translated to chat for the others -------------

    def check_responses(self, upstream: UpstreamConfig, body: dict) -> None:
        if not upstream.responses_api:
            responses_chat.to_chat(body)  # raises UntranslatableError (400) naming the field

    def _chat_body(self, upstream: UpstreamConfig, body: dict) -> dict:
        chat = responses_chat.to_chat(body)
        cap = chat.pop("max_tokens", None)
        if cap is not None:
            chat[upstream.max_tokens_field] = cap
        return chat

    def responses(self, upstream: UpstreamConfig, body: dict) -> ResponsesResult:
        if upstream.responses_api:
            doc = call(upstream, "responses", body)
            if not isinstance(doc.get("output"), list):
                raise UpstreamError(f"The upstream '{upstream.name}' answered without 'output'.")
            return ResponsesResult(doc=doc, usage_report=doc.get("usage"), texts=[output_text(doc["output"])])
        result = self.chat(upstream, "chat", self._chat_body(upstream, body))
        try:
            doc = responses_chat.from_chat(result.doc, body, new_response_id(), int(time.time()))
        except responses_chat.BadChatAnswerError:
            raise UpstreamError(f"The upstream '{upstream.name}' answered without a choice.") from None
        return ResponsesResult(doc=doc, usage_report=result.usage_report, texts=result.texts)

    def responses_stream(self, upstream: UpstreamConfig, body: dict) -> NativeResponsesStream | ChatResponsesStream:
        if upstream.responses_api:
            resp = open_stream(upstream, "responses", {**body, "stream": True})
            return NativeResponsesStream(upstream, resp)
        chat = self._chat_body(upstream, {**body, "stream": True})
        return ChatResponsesStream(body, self.chat_stream(upstream, "chat", chat))

    # --- Embeddings, moderations, speech, transcription -----------------------------------------------------

    def embeddings(self, upstream: UpstreamConfig, body: dict) -> dict:
        doc = call(upstream, "embeddings", body)
        if not isinstance(doc.get("data"), list):
            raise UpstreamError(f"The upstream '{upstream.name}' answered without 'data'.")
        return doc

    def moderations(self, upstream: UpstreamConfig, body: dict) -> dict:
        doc = call(upstream, "moderations", body)
        if not isinstance(doc.get("results"), list):
            raise UpstreamError(f"The upstream '{upstream.name}' answered without 'results'.")
        return doc

    def speech(self, upstream: UpstreamConfig, model: ModelConfig, body: dict, want_usage: bool) -> SpeechResult:
        """Raw audio relayed as it arrives. With want_usage and a client that asked for raw audio, the upstream is
        asked for its SSE form (OpenAI's stream_format "sse", whose speech.audio.done carries usage) and the
        audio is decoded back to bytes here; a client that asked for SSE gets the events as they are."""
        client_sse = body.get("stream_format") == "sse"
        decode = want_usage and not client_sse
        up_body = {**body, "stream_format": "sse"} if decode else body
        resp = open_stream(upstream, "audio/speech", up_body, accept="")  # audio of any type, or SSE
        # An upstream that ignored stream_format sent the audio itself: relayed as it is, and no usage comes.
        decode = decode and "event-stream" in (resp.headers.get("Content-Type") or "")
        fmt = body.get("response_format") or "mp3"
        content_type = (AUDIO_TYPES.get(fmt, "application/octet-stream") if decode
                        else resp.headers.get("Content-Type") or "application/octet-stream")
        result = SpeechResult(content_type=content_type, chunks=None, close=resp.close)

        def raw() -> Iterator[bytes]:
            parser = SSEParser(upstream.name, upstream.max_event_bytes) if client_sse else None
            while True:
                try:
                    chunk = resp.raw.read1(READ_SIZE)
                except Exception:
                    raise UpstreamError(f"The upstream '{upstream.name}' broke off the audio.") from None
                if not chunk:
                    resp.finish()
                    return
                for data in parser.feed(chunk) if parser else ():
                    _note_speech_usage(result, data)
                yield chunk

        def decoded() -> Iterator[bytes]:
            for data in iter_events(upstream, resp, eof_ends=True):
                event = _note_speech_usage(result, data)
                audio = event.get("audio") if event.get("type") == "speech.audio.delta" else None
                if isinstance(audio, str) and audio:
                    try:
                        yield base64.b64decode(audio, validate=True)
                    except ValueError:
                        raise UpstreamError(f"The upstream '{upstream.name}' sent audio that is not base64.") \
                            from None
            resp.finish()

        result.chunks = decoded if decode else raw
        return result

    def transcription(self, upstream: UpstreamConfig, route: str, fields: list[tuple[str, str]], filename: str,
                      content_type: str, file: Any, size: int) -> TranscriptionResult:
        boundary = "gateway" + os.urandom(16).hex()
        head = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"\r\n\r\n{value}\r\n'.encode()
            for name, value in fields)
        head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{_quote(filename)}"\r\n'
                 f"Content-Type: {content_type}\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def body() -> Iterator[bytes]:
            yield head
            file.seek(0)
            while block := file.read(READ_SIZE):
                yield block
            yield tail

        headers = {**_headers(upstream), "Content-Type": f"multipart/form-data; boundary={boundary}",
                   "Content-Length": str(len(head) + size + len(tail))}
        resp = post(upstream, _url(upstream, f"audio/{route}"), body(), headers)
        try:
            if resp.status_code != 200:
                raise parse_error(upstream, resp)
            kind = resp.headers.get("Content-Type") or "application/json"
            doc = _json_object(upstream, resp.content) if "json" in kind else None
            return TranscriptionResult(body=resp.content, content_type=kind, doc=doc)
        finally:
            resp.close()


AUDIO_TYPES = {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac", "flac": "audio/flac",
               "wav": "audio/wav", "pcm": "audio/pcm"}
_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def _quote(text: str) -> str:
    """A multipart header parameter: quotes and line breaks would end it early."""
    return text.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _note_speech_usage(result: SpeechResult, data: bytes) -> dict:
    try:
        event = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(event, dict):
        return {}
    if event.get("type") == "speech.audio.done" and isinstance(event.get("usage"), dict):
        result.usage_report = event["usage"]
    return event


def new_response_id() -> str:
    return "resp_" + os.urandom(24).hex()


def output_text(output: list) -> str:
    """The text and call arguments of a Response's output items, for counting when no usage is believable."""
    parts = []
    for item in output:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call":
            parts.append(str(item.get("name") or "") + str(item.get("arguments") or ""))
        for part in item.get("content") or [] if isinstance(item.get("content"), list) else []:
            if isinstance(part, dict):
                parts.append(str(part.get("text") or part.get("refusal") or ""))
    return "".join(parts)


def _event_texts(doc: dict) -> dict[int, str]:
    if doc.get("type") in ("response.output_text.delta", "response.refusal.delta",
                           "response.function_call_arguments.delta") and isinstance(doc.get("delta"), str):
        return {0: doc["delta"]}
    return {}


def _responses_event(doc: dict, data: bytes) -> ResponsesEvent:
    kind = doc.get("type")
    terminal = kind in _TERMINAL
    usage = None
    if terminal and isinstance(doc.get("response"), dict):
        usage = doc["response"].get("usage")
    frame = b"event: " + str(kind).encode() + b"\ndata: " + data + b"\n\n"
    return ResponsesEvent(data=frame, doc=doc, usage_report=usage, texts=_event_texts(doc), terminal=terminal)


class NativeResponsesStream:
    """An upstream's own Responses stream: every event relayed as it came, until its terminal event."""

    def __init__(self, upstream: UpstreamConfig, resp: Reply) -> None:
        self.upstream, self.resp = upstream, resp
        self.seq = 0

    def events(self) -> Iterator[ResponsesEvent]:
        for data in iter_events(self.upstream, self.resp, eof_ends=True):
            try:
                doc = json.loads(data)
            except ValueError:
                doc = None
            if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
                raise UpstreamError(f"The upstream '{self.upstream.name}' sent an event that is not a typed object.")
            if doc["type"] == "error":
                raise UpstreamError(str(doc.get("message") or "The upstream failed mid-stream."))
            if isinstance(doc.get("sequence_number"), int):
                self.seq = doc["sequence_number"] + 1
            event = _responses_event(doc, data)
            yield event
            if event.terminal:
                return
        raise UpstreamError(f"The upstream '{self.upstream.name}' ended the stream before it was complete.")

    def finish(self) -> None:
        self.resp.finish()

    def close(self) -> None:
        self.resp.close()

    def failed(self, exc: GatewayError) -> bytes:
        # The Responses API's own mid-stream error event; the SDKs raise it as an APIError.
        doc = {"type": "error", "code": exc.code or exc.type, "message": exc.message, "param": exc.param,
               "sequence_number": self.seq}
        return b"event: error\ndata: " + json.dumps(doc).encode() + b"\n\n"


class ChatResponsesStream:
    """A chat completions stream turned into typed Responses events by responses_chat.StreamTranslator."""

    def __init__(self, request: dict, chat: _Stream) -> None:
        self.chat = chat
        self.translator = responses_chat.StreamTranslator(request, new_response_id(), int(time.time()))

    def _out(self, events: list[dict]) -> Iterator[ResponsesEvent]:
        for event in events:
            yield _responses_event(event, json.dumps(event, separators=(",", ":")).encode())

    def events(self) -> Iterator[ResponsesEvent]:
        yield from self._out(self.translator.start())
        for chunk in self.chat.events():
            yield from self._out(self.translator.feed(chunk.doc))
            if self.translator.done:
                return
        yield from self._out(self.translator.finish(int(time.time())))

    def finish(self) -> None:
        self.chat.finish()

    def close(self) -> None:
        self.chat.close()

    def failed(self, exc: GatewayError) -> bytes:
        return b"".join(e.data for e in self._out(self.translator.fail(exc.message)))


PROVIDER = OpenAIProvider()
