"""The OpenAI Responses API spoken over a chat-completions upstream: pure translation, both directions.

`to_chat` turns a `POST /v1/responses` body into a chat.completions body; `from_chat` turns the chat.completion
answer into a Response object; `StreamTranslator` turns chat.completion.chunk dicts into typed Responses stream
events. No Flask, no network, no money: the route owns those.

What a stateless chat upstream cannot do is refused with `UntranslatableError` naming the request field, never
dropped quietly. Decisions where the two APIs differ:
  - `developer` messages become `system` messages: Gemini and local servers do not know the developer role.
  - `metadata` is not sent upstream (chat only accepts it with `store`); it is echoed on the Response, which is
    where the Responses API returns it.
  - `reasoning.effort` is sent as `reasoning_effort` (Gemini's OpenAI endpoint and OpenAI accept it); a
    reasoning `summary` is refused, since chat has no way to ask for one.
  - `store` and `background` are accepted only when false; omitted `store` counts as false (nothing is kept).
  - `include` is refused for every value: each one asks for state, logprobs or built-in tool output.
  - `stream_options.include_obfuscation` is accepted and has no effect: no obfuscation padding is sent.
"""
from __future__ import annotations

import copy
import json
from typing import Any

from errors import BadRequestError

# Request fields passed to chat under the same name and meaning.
_SAME_NAME = ("model", "temperature", "top_p", "user", "service_tier", "safety_identifier", "prompt_cache_key",
              "prompt_cache_retention")
# Request fields handled below; anything else is refused rather than silently ignored.
_KNOWN = {*_SAME_NAME, "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens",
          "text", "metadata", "stream", "stream_options", "reasoning", "store", "background", "previous_response_id",
          "conversation", "include", "truncation", "top_logprobs", "max_tool_calls", "prompt"}
_STATEFUL = {"previous_response_id": "previous responses are not stored by this gateway",
             "conversation": "conversations are not stored by this gateway",
             "prompt": "stored prompt templates are not available on this gateway"}
_FUNCTION_TOOL_KEYS = {"type", "name", "description", "parameters", "strict"}
_CHAT_FINISH_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


class UntranslatableError(BadRequestError, ValueError):
    """A Responses request field a chat-completions upstream cannot honour; `param` names the field path.

    It is an BadRequestError (HTTP 400, OpenAI-shaped body with param) and a ValueError for callers that only
    want to know the input was bad.
    """

    code = "unsupported_parameter"

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, param=param)



class BadChatAnswerError(ValueError):
    """The upstream's chat answer has no choice to translate; the route reports it as an upstream error."""


# ---------------------------------------------------------------------------------------------- request


def _refuse(message: str, param: str) -> UntranslatableError:
    return UntranslatableError(message, param)


def _text_of(parts: list, param: str, allowed: tuple[str, ...]) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") not in allowed:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _refuse(f"Content part type '{kind}' is not supported here; use {' or '.join(allowed)}.",
                          f"{param}[{j}]")
        text = part.get("text")
        if not isinstance(text, str):
            raise _refuse("A text content part needs a string 'text'.", f"{param}[{j}].text")
        texts.append(text)
    return "".join(texts)


def _user_parts(parts: list, param: str) -> list[dict]:
    out: list[dict] = []
    for j, part in enumerate(parts):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_text":
            if not isinstance(part.get("text"), str):
                raise _refuse("An input_text part needs a string 'text'.", f"{where}.text")
            out.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            if part.get("file_id"):
                raise _refuse("Images by file_id are not available on this gateway; send image_url (an https "
                              "URL or a data: URL).", f"{where}.file_id")
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise _refuse("An input_image part needs an image_url.", f"{where}.image_url")
            image: dict[str, Any] = {"url": url}
            detail = part.get("detail")
            if detail not in (None, "auto", "low", "high"):
                raise _refuse(f"Image detail '{detail}' is not supported here; use auto, low or high.",
                              f"{where}.detail")
            if detail:
                image["detail"] = detail
            out.append({"type": "image_url", "image_url": image})
        elif kind in ("input_file", "input_audio"):
            raise _refuse(f"'{kind}' content is not supported for this model.", f"{where}.type")
        else:
            raise _refuse(f"Content part type '{kind}' is not supported in a user message.", f"{where}.type")
    return out


def _message(item: dict, param: str) -> dict:
    role = item.get("role")
    content = item.get("content")
    if role not in ("user", "assistant", "system", "developer"):
        raise _refuse(f"Message role '{role}' is not supported; use user, assistant, system or developer.",
                      f"{param}.role")
    if not isinstance(content, (str, list)):
        raise _refuse("A message's content must be a string or a list of content parts.", f"{param}.content")
    chat_role = "system" if role == "developer" else role
    if isinstance(content, str):
        return {"role": chat_role, "content": content}
    if role == "user":
        return {"role": "user", "content": _user_parts(content, f"{param}.content")}
    if role == "assistant":
        texts, refusals = [], []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                refusals.append(part["refusal"])
            elif isinstance(part, dict) and part.get("type") in ("output_text", "input_text") \
                    and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _refuse(f"Content part type '{kind}' is not supported in an assistant message.",
                              f"{param}.content[{j}]")
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if refusals:
            msg["refusal"] = "".join(refusals)
        return msg
    return {"role": chat_role, "content": _text_of(content, f"{param}.content", ("input_text",))}


def _tool_output(item: dict, param: str) -> dict:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _refuse("A function_call_output item needs its call_id.", f"{param}.call_id")
    output = item.get("output")
    if isinstance(output, list):
        output = _text_of(output, f"{param}.output", ("input_text",))
    if not isinstance(output, str):
        raise _refuse("A function_call_output's output must be a string or input_text parts.", f"{param}.output")
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _messages(body: dict) -> list[dict]:
    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _refuse("instructions must be a string.", "instructions")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _refuse("input must be a string or a non-empty list of input items.", "input")
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise _refuse("Each input item must be an object.", param)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
            for key, value in (("call_id", call_id), ("name", name), ("arguments", arguments)):
                if not isinstance(value, str):
                    raise _refuse(f"A function_call item needs a string {key}.", f"{param}.{key}")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            # One assistant turn of Responses (a message, then its calls) is one chat assistant message.
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if last.get("content") == "":
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(_tool_output(item, param))
        elif kind == "item_reference":
            raise _refuse("Item references need stored responses, which this gateway does not keep.", param)
        else:
            raise _refuse(f"Input item type '{kind}' cannot be sent to this model.", f"{param}.type")
    return messages


def _tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise _refuse("tools must be a list.", "tools")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise _refuse(f"Tool type '{kind}' is a built-in tool this model cannot run; only function tools "
                          "are supported.", f"tools[{i}].type")
        extra = sorted(k for k, v in tool.items() if k not in _FUNCTION_TOOL_KEYS and v not in (None, False))
        if extra:
            raise _refuse(f"Function tool field '{extra[0]}' is not supported here.", f"tools[{i}].{extra[0]}")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise _refuse("A function tool needs a name.", f"tools[{i}].name")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("none", "auto", "required"):
        return choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind == "allowed_tools" and choice.get("mode") in ("auto", "required"):
        allowed = []
        for i, tool in enumerate(choice.get("tools") or []):
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
                raise _refuse("Only function tools can be allowed here.", f"tool_choice.tools[{i}]")
            allowed.append({"type": "function", "function": {"name": tool["name"]}})
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice["mode"], "tools": allowed}}
    raise _refuse(f"tool_choice {json.dumps(choice)} is not supported; use none, auto, required or a function.",
                  "tool_choice")


def _response_format(text: Any) -> dict | None:
    if not isinstance(text, dict):
        raise _refuse("text must be an object.", "text")
    extra = sorted(k for k in text if k not in ("format", "verbosity"))
    if extra:
        raise _refuse(f"text.{extra[0]} is not supported here.", f"text.{extra[0]}")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise _refuse("A json_schema format needs a name and a schema object.", "text.format")
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise _refuse(f"Text format '{kind}' is not supported; use text, json_object or json_schema.", "text.format.type")


def to_chat(body: dict) -> dict:
    """A Responses create request as a chat.completions request; raises UntranslatableError naming the field."""
    if not isinstance(body, dict):
        raise _refuse("The request body must be a JSON object.", "body")
    unknown = sorted(k for k in body if k not in _KNOWN)
    if unknown:
        raise _refuse(f"Unknown or unsupported parameter '{unknown[0]}'.", unknown[0])
    for field, why in _STATEFUL.items():
        if body.get(field) is not None:
            raise _refuse(f"{field} is not supported: {why}.", field)
    for field in ("store", "background"):
        if body.get(field):
            raise _refuse(f"{field}: true is not supported: this gateway does not keep responses.", field)
    include = body.get("include")
    if include:
        raise _refuse(f"include value {json.dumps(include[0] if isinstance(include, list) else include)} is not "
                      "available for this model.", "include[0]" if isinstance(include, list) else "include")
    if body.get("truncation") not in (None, "disabled"):
        raise _refuse("truncation 'auto' is not supported; the prompt is sent whole.", "truncation")
    for field in ("top_logprobs", "max_tool_calls"):
        if body.get(field) is not None:
            raise _refuse(f"{field} is not supported for this model.", field)
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _refuse("metadata must be an object of strings.", "metadata")

    chat: dict[str, Any] = {k: body[k] for k in _SAME_NAME if body.get(k) is not None}
    chat["messages"] = _messages(body)
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
        if body.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = bool(body["parallel_tool_calls"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    max_out = body.get("max_output_tokens")
    if max_out is not None:
        if not isinstance(max_out, int) or isinstance(max_out, bool) or max_out < 1:
            raise _refuse("max_output_tokens must be a positive integer.", "max_output_tokens")
        chat["max_tokens"] = max_out
    if body.get("text") is not None:
        fmt = _response_format(body["text"])
        if fmt is not None:
            chat["response_format"] = fmt
        if body["text"].get("verbosity") is not None:
            chat["verbosity"] = body["text"]["verbosity"]
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise _refuse("reasoning must be an object.", "reasoning")
        for key in ("summary", "generate_summary"):
            if reasoning.get(key) is not None:
                raise _refuse("Reasoning summaries are not available for this model.", f"reasoning.{key}")
        extra = sorted(k for k in reasoning if k not in ("effort", "summary", "generate_summary"))
        if extra:
            raise _refuse(f"reasoning.{extra[0]} is not supported here.", f"reasoning.{extra[0]}")
        if reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _refuse("stream_options must be an object.", "stream_options")
        extra = sorted(k for k in opts if k != "include_obfuscation")
        if extra:
            raise _refuse(f"stream_options.{extra[0]} is not supported here.", f"stream_options.{extra[0]}")
    # The route rewrites chat bodies (vision bridging, model names); the client's body must stay as it came.
    return copy.deepcopy(chat)


# ---------------------------------------------------------------------------------------------- response


def _suffix(response_id: str) -> str:
    return response_id.split("_", 1)[1] if "_" in response_id else response_id


def message_id(response_id: str, index: int = 0) -> str:
    """The id of the response's message item: derived from the response id, so both directions agree."""
    return f"msg_{_suffix(response_id)}" + (f"_{index}" if index else "")


def call_item_id(response_id: str, index: int) -> str:
    return f"fc_{_suffix(response_id)}_{index}"


def usage_from_chat(usage: dict | None) -> dict | None:
    """Chat usage (prompt/completion tokens with details) as Responses usage (input/output tokens)."""
    if not isinstance(usage, dict):
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    prompt_details = usage.get("prompt_tokens_details") or {}
    cached = int(prompt_details.get("cached_tokens") or 0)
    cache_write = int(prompt_details.get("cache_write_tokens") or 0)
    reasoning = int(((usage.get("completion_tokens_details") or {}).get("reasoning_tokens")) or 0)
    total = usage.get("total_tokens")
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": cache_write},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": int(total) if isinstance(total, int) else prompt + completion}


def _status(finish_reason: str | None) -> tuple[str, dict | None]:
    reason = _CHAT_FINISH_INCOMPLETE.get(finish_reason or "")
    return ("incomplete", {"reason": reason}) if reason else ("completed", None)


def response_object(request: dict, response_id: str, created_at: int, *, status: str, output: list[dict],
                    usage: dict | None, incomplete_details: dict | None = None, error: dict | None = None,
                    completed_at: int | None = None) -> dict:
    """A Response object echoing the request's settings, as the Responses API returns them."""
    tools = []
    for tool in request.get("tools") or []:
        tools.append({"type": "function", "name": tool.get("name"), "description": tool.get("description"),
                      "parameters": tool.get("parameters"), "strict": tool.get("strict")})
    reasoning = request.get("reasoning")
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "completed_at": completed_at if status == "completed" else None,
        "error": error, "incomplete_details": incomplete_details,
        "instructions": request.get("instructions"), "model": request.get("model"), "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "temperature": request.get("temperature"), "top_p": request.get("top_p"),
        "tool_choice": request.get("tool_choice", "auto"), "tools": tools,
        "max_output_tokens": request.get("max_output_tokens"), "max_tool_calls": None,
        "previous_response_id": None, "background": False, "store": False, "truncation": "disabled",
        "reasoning": {"effort": reasoning.get("effort"), "summary": None} if isinstance(reasoning, dict) else None,
        "text": request.get("text") or {"format": {"type": "text"}},
        "metadata": request.get("metadata") or {}, "user": request.get("user"),
        "service_tier": request.get("service_tier"), "safety_identifier": request.get("safety_identifier"),
        "prompt_cache_key": request.get("prompt_cache_key"), "usage": usage,
    }


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def from_chat(chat_doc: dict, request: dict, response_id: str, created_at: int,
              completed_at: int | None = None) -> dict:
    """A chat.completion as the Response object for `request` (the original Responses body)."""
    choices = chat_doc.get("choices") if isinstance(chat_doc, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadChatAnswerError("The upstream's chat answer has no choices.")
    choice = choices[0]
    msg = choice.get("message") or {}
    status, incomplete = _status(choice.get("finish_reason"))
    item_status = "completed" if status == "completed" else "incomplete"
    output: list[dict] = []
    content, refusal = msg.get("content"), msg.get("refusal")
    tool_calls = msg.get("tool_calls") or []
    if isinstance(content, list):  # some servers answer with text parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content or refusal or not tool_calls:
        parts = []
        if content or not refusal:
            parts.append(_text_part(content or ""))
        if refusal:
            parts.append({"type": "refusal", "refusal": refusal})
        output.append({"id": message_id(response_id), "type": "message", "role": "assistant",
                       "status": item_status, "content": parts})
    for i, call in enumerate(tool_calls):
        function = call.get("function") or {}
        output.append({"id": call_item_id(response_id, i), "type": "function_call", "status": item_status,
                       "call_id": call.get("id") or f"call_{_suffix(response_id)}_{i}",
                       "name": function.get("name") or "", "arguments": function.get("arguments") or ""})
    return response_object(request, response_id, created_at, status=status, output=output,
                           usage=usage_from_chat(chat_doc.get("usage")), incomplete_details=incomplete,
                           completed_at=completed_at if completed_at is not None else created_at)


# ---------------------------------------------------------------------------------------------- stream


def sse(event: dict) -> bytes:
    """One Responses stream event as it goes on the wire: a named SSE event with a JSON data line."""
    return b"event: " + event["type"].encode() + b"\ndata: " + json.dumps(event).encode() + b"\n\n"


class StreamTranslator:
    """Chat completion chunks in, typed Responses stream events out, each with its sequence_number.

    `start()` gives response.created and response.in_progress (feed calls it if nobody did); `feed(chunk)` the
    events one chunk makes; `finish()` closes every open item and ends with response.completed or
    response.incomplete, or response.failed when the upstream never said why it stopped; `fail(message)` ends
    with response.failed for an upstream error mid-stream.
    """

    def __init__(self, request: dict, response_id: str, created_at: int) -> None:
        self.request = request
        self.response_id = response_id
        self.created_at = created_at
        self.seq = 0
        self.started = False
        self.done = False
        self.output: list[dict] = []  # every item in output order; open ones are completed in place
        self.message: dict | None = None  # the open message item
        self.part: dict | None = None  # its open content part
        self.calls: dict[int, dict] = {}  # chat tool-call index -> open function_call item
        self.pending_args: dict[int, str] = {}  # arguments that came before the call's name
        self.finish_reason: str | None = None
        self.usage: dict | None = None

    def _event(self, type_: str, **fields: Any) -> dict:
        event = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def _snapshot(self, status: str, **kw: Any) -> dict:
        return response_object(self.request, self.response_id, self.created_at, status=status,
                               output=json.loads(json.dumps(self.output)), usage=kw.pop("usage", None), **kw)

    def start(self) -> list[dict]:
        if self.started:
            return []
        self.started = True
        snap = self._snapshot("in_progress")
        return [self._event("response.created", response=snap), self._event("response.in_progress", response=snap)]

    def _index(self, item: dict) -> int:
        return self.output.index(item)

    def _open_message(self) -> list[dict]:
        item = {"id": message_id(self.response_id, len(self.output)), "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        self.output.append(item)
        self.message = item
        return [self._event("response.output_item.added", output_index=self._index(item),
                            item=json.loads(json.dumps(item)))]

    def _open_part(self, kind: str) -> list[dict]:
        events = self._close_part()
        if self.message is None:
            events += self._open_message()
        assert self.message is not None
        part = _text_part("") if kind == "output_text" else {"type": "refusal", "refusal": ""}
        self.message["content"].append(part)
        self.part = part
        events.append(self._event("response.content_part.added", item_id=self.message["id"],
                                  output_index=self._index(self.message),
                                  content_index=len(self.message["content"]) - 1, part=dict(part)))
        return events

    def _close_part(self) -> list[dict]:
        part, msg = self.part, self.message
        if part is None or msg is None:
            return []
        self.part = None
        where = {"item_id": msg["id"], "output_index": self._index(msg), "content_index": msg["content"].index(part)}
        if part["type"] == "output_text":
            done = self._event("response.output_text.done", **where, text=part["text"], logprobs=[])
        else:
            done = self._event("response.refusal.done", **where, refusal=part["refusal"])
        return [done, self._event("response.content_part.done", **where, part=dict(part))]

    def _close_message(self, status: str) -> list[dict]:
        events = self._close_part()
        msg = self.message
        if msg is None:
            return events
        self.message = None
        msg["status"] = status
        events.append(self._event("response.output_item.done", output_index=self._index(msg),
                                  item=json.loads(json.dumps(msg))))
        return events

    def _text(self, kind: str, delta: str) -> list[dict]:
        events: list[dict] = []
        if self.part is None or self.part["type"] != kind:
            events += self._open_part(kind)
        assert self.part is not None and self.message is not None
        where = {"item_id": self.message["id"], "output_index": self._index(self.message),
                 "content_index": self.message["content"].index(self.part)}
        if kind == "output_text":
            self.part["text"] += delta
            events.append(self._event("response.output_text.delta", **where, delta=delta, logprobs=[]))
        else:
            self.part["refusal"] += delta
            events.append(self._event("response.refusal.delta", **where, delta=delta))
        return events

    def _tool_delta(self, call: dict) -> list[dict]:
        index = call.get("index", 0)
        function = call.get("function") or {}
        args = function.get("arguments") or ""
        events: list[dict] = []
        item = self.calls.get(index)
        if item is None:
            if not function.get("name"):
                self.pending_args[index] = self.pending_args.get(index, "") + args
                return events
            # A call ends the message before it: Responses keeps text and calls in separate items.
            events += self._close_message("completed")
            item = {"id": call_item_id(self.response_id, len(self.calls)), "type": "function_call",
                    "status": "in_progress", "call_id": call.get("id") or f"call_{_suffix(self.response_id)}_{index}",
                    "name": function["name"], "arguments": ""}
            self.output.append(item)
            self.calls[index] = item
            events.append(self._event("response.output_item.added", output_index=self._index(item),
                                      item=dict(item)))
            args = self.pending_args.pop(index, "") + args
        if args:
            item["arguments"] += args
            events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=self._index(item), delta=args))
        return events

    def feed(self, chunk: dict) -> list[dict]:
        """The events for one parsed chat.completion.chunk (a usage-only chunk gives none).

        An `{"error": ...}` event in place of a chunk (how OpenAI-compatible servers fail mid-stream) ends the
        stream with response.failed; `done` then tells the caller no more events will come.
        """
        if self.done:
            return []
        events = self.start()
        error = chunk.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else None
            return events + self.fail(f"The upstream failed mid-stream: {message or error}")
        if isinstance(chunk.get("usage"), dict):
            self.usage = usage_from_chat(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.calls and self.message is None:
                    events += self._close_calls("completed")
                events += self._text("output_text", delta["content"])
            if delta.get("refusal"):
                events += self._text("refusal", delta["refusal"])
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    events += self._tool_delta(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def _close_calls(self, status: str) -> list[dict]:
        events = []
        for item in self.calls.values():
            item["status"] = status
            where = {"item_id": item["id"], "output_index": self._index(item)}
            events.append(self._event("response.function_call_arguments.done", **where, name=item["name"],
                                      arguments=item["arguments"]))
            events.append(self._event("response.output_item.done", output_index=where["output_index"],
                                      item=dict(item)))
        self.calls = {}
        return events

    def finish(self, completed_at: int | None = None) -> list[dict]:
        """The closing events once the upstream stream has ended ([DONE] or end of body)."""
        if self.done:
            return []
        if self.finish_reason is None:
            return self.fail("The upstream stream ended before the answer was finished.")
        events = self.start()
        status, incomplete = _status(self.finish_reason)
        item_status = "completed" if status == "completed" else "incomplete"
        if not self.output:  # an empty answer is still one (empty) message, as from_chat gives
            events += self._open_part("output_text")
        events += self._close_message(item_status) + self._close_calls(item_status)
        self.done = True
        snap = self._snapshot(status, usage=self.usage, incomplete_details=incomplete,
                              completed_at=completed_at if completed_at is not None else self.created_at)
        return events + [self._event(f"response.{status}", response=snap)]

    def fail(self, message: str, code: str = "server_error") -> list[dict]:
        """Ends the stream with response.failed (open items marked incomplete) after an upstream failure."""
        if self.done:
            return []
        events = self.start() + self._close_message("incomplete") + self._close_calls("incomplete")
        self.done = True
        snap = self._snapshot("failed", usage=self.usage, error={"code": code, "message": message})
        return events + [self._event("response.failed", response=snap)]
