"""A fake native Responses API upstream: a real HTTP server on 127.0.0.1 answering POST /v1/responses.

Written independently of providers/responses_chat.py (it never calls it), so a passthrough test compares the
gateway against a separate rendering of the wire format: plain JSON Response objects, and `stream: true` as
named SSE events (`event: <type>` + `data: {...}`) ending in response.completed, without a [DONE] line.

Behaviour is chosen by magic words in the input's last text:
  [usage=I,O]     report I input and O output tokens (default 13, and the text deltas plus reasoning)
  [cached=N]      N of the input tokens were cached (default 0)
  [reasoning=N]   N of the output tokens were reasoning (default 0), shown as a reasoning item in the output
  [tool=NAME]     answer with a function_call to NAME (arguments {"city": "Paris"}) instead of text
  [chunks=N]      stream N text deltas (default 3)
  [incomplete]    stop as if max_output_tokens was reached (status incomplete)
  [error400] [error429] [error500]   answer with that HTTP error
  [cut]           stream the first delta, then drop the connection
Run alone for demos: python -m tests.fake_responses --port 9998 --key sk-upstream
"""
from __future__ import annotations

import argparse
import json
import re
import time
from typing import Any

from tests.fake_http import FakeHandler, FakeUpstream

REPLY_WORDS = ["Hello ", "from ", "Responses", "!", " more", " words"]


def _last_text(body: dict) -> str:
    items = body.get("input")
    if isinstance(items, str):
        return items
    for item in reversed(items if isinstance(items, list) else []):
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


class _Handler(FakeHandler):
    def _error(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
               headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": {"message": message, "type": type_, "param": param, "code": code}}, headers)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.server.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                     "body": body})
        if self.headers.get("Authorization") != f"Bearer {self.server.key}":
            return self._error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if self.path.rstrip("/") != "/v1/responses":
            return self._error(404, f"Unknown path {self.path}.", "invalid_request_error")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return self._error(400, "Missing required parameter: 'model'.", "invalid_request_error",
                               "missing_required_parameter", "model")
        if not isinstance(body.get("input"), (str, list)):
            return self._error(400, "Missing required parameter: 'input'.", "invalid_request_error",
                               "missing_required_parameter", "input")
        text = _last_text(body)
        for status, type_ in ((400, "invalid_request_error"), (429, "rate_limit_error"), (500, "server_error")):
            if f"[error{status}]" in text:
                headers = {"Retry-After": "3"} if status == 429 else None
                return self._error(status, f"Fake Responses error {status}.", type_, None, None, headers)
        plan = _Plan(body, text)
        if body.get("stream"):
            return self._stream(plan, "[cut]" in text)
        self._json(200, plan.response("incomplete" if plan.incomplete else "completed", plan.final_output()))

    def _write(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(self, plan: _Plan, cut: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        seq = 0

        def send(type_: str, **fields: Any) -> None:
            nonlocal seq
            doc = {"type": type_, "sequence_number": seq, **fields}
            seq += 1
            self._write(f"event: {type_}\ndata: {json.dumps(doc)}\n\n".encode())

        try:
            send("response.created", response=plan.response("in_progress", []))
            send("response.in_progress", response=plan.response("in_progress", []))
            index = 0
            if plan.reasoning:
                item = plan.reasoning_item()
                send("response.output_item.added", output_index=index, item={**item, "status": "in_progress"})
                send("response.output_item.done", output_index=index, item=item)
                index += 1
            item_status = "incomplete" if plan.incomplete else "completed"
            if plan.tool:
                call = plan.call_item()
                send("response.output_item.added", output_index=index,
                     item={**call, "arguments": "", "status": "in_progress"})
                for piece in (call["arguments"][:5], call["arguments"][5:]):
                    send("response.function_call_arguments.delta", item_id=call["id"], output_index=index,
                         delta=piece)
                send("response.function_call_arguments.done", item_id=call["id"], output_index=index,
                     name=call["name"], arguments=call["arguments"])
                send("response.output_item.done", output_index=index, item={**call, "status": item_status})
            else:
                msg_id = "msg_fake_1"
                where = {"item_id": msg_id, "output_index": index, "content_index": 0}
                send("response.output_item.added", output_index=index,
                     item={"id": msg_id, "type": "message", "role": "assistant", "status": "in_progress",
                           "content": []})
                send("response.content_part.added", item_id=msg_id, output_index=index, content_index=0,
                     part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                for n, word in enumerate(plan.words):
                    send("response.output_text.delta", **where, delta=word, logprobs=[])
                    if cut and n == 0:
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                full = "".join(plan.words)
                send("response.output_text.done", **where, text=full, logprobs=[])
                part = {"type": "output_text", "text": full, "annotations": [], "logprobs": []}
                send("response.content_part.done", **where, part=part)
                send("response.output_item.done", output_index=index, item=plan.message_item(item_status))
            if plan.incomplete:
                send("response.incomplete", response=plan.response("incomplete", plan.final_output()))
            else:
                send("response.completed", response=plan.response("completed", plan.final_output()))
            self._write(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnects += 1


class _Plan:
    """One answer, decided from the request before anything is sent, so plain and streamed agree."""

    def __init__(self, body: dict, text: str) -> None:
        self.body = body
        self.created = int(time.time())
        m = re.search(r"\[chunks=(\d+)\]", text)
        self.words = [REPLY_WORDS[i % len(REPLY_WORDS)] for i in range(int(m.group(1)) if m else 3)]
        m = re.search(r"\[tool=(\w+)\]", text)
        self.tool = m.group(1) if m else None
        m = re.search(r"\[cached=(\d+)\]", text)
        self.cached = int(m.group(1)) if m else 0
        m = re.search(r"\[reasoning=(\d+)\]", text)
        self.reasoning = int(m.group(1)) if m else 0
        m = re.search(r"\[usage=(\d+),(\d+)\]", text)
        self.input_tokens, self.output_tokens = ((int(m.group(1)), int(m.group(2))) if m
                                                 else (13, len(self.words) + self.reasoning))
        self.incomplete = "[incomplete]" in text

    def reasoning_item(self) -> dict:
        return {"id": "rs_fake_1", "type": "reasoning", "summary": [], "status": "completed"}

    def call_item(self) -> dict:
        return {"id": "fc_fake_1", "type": "function_call", "call_id": "call_fake_1", "name": self.tool,
                "arguments": json.dumps({"city": "Paris"}), "status": "completed"}

    def message_item(self, status: str) -> dict:
        return {"id": "msg_fake_1", "type": "message", "role": "assistant", "status": status,
                "content": [{"type": "output_text", "text": "".join(self.words), "annotations": [],
                             "logprobs": []}]}

    def final_output(self) -> list[dict]:
        status = "incomplete" if self.incomplete else "completed"
        out = [self.reasoning_item()] if self.reasoning else []
        return out + [{**self.call_item(), "status": status} if self.tool else self.message_item(status)]

    def usage(self) -> dict:
        return {"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": self.cached,
                                                                         "cache_write_tokens": 0},
                "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": self.reasoning},
                "total_tokens": self.input_tokens + self.output_tokens}

    def response(self, status: str, output: list[dict]) -> dict:
        body = self.body
        done = status in ("completed", "incomplete")
        return {"id": "resp_fake_1", "object": "response", "created_at": self.created, "status": status,
                "completed_at": self.created if status == "completed" else None, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": body.get("instructions"), "model": body["model"], "output": output,
                "parallel_tool_calls": body.get("parallel_tool_calls", True),
                "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
                "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
                "max_output_tokens": body.get("max_output_tokens"), "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "store": bool(body.get("store", True)),
                "text": body.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
                "metadata": body.get("metadata") or {}, "user": None,
                "usage": self.usage() if done else None}


class FakeResponses(FakeUpstream):
    handler = _Handler


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9998)
    parser.add_argument("--key", default="sk-upstream-test")
    args = parser.parse_args()
    fake = FakeResponses(args.key, args.port)
    print(f"fake Responses upstream on {fake.base_url} (key {args.key})", flush=True)
    fake.server.serve_forever()
