"""The Responses <-> chat translation (providers/responses_chat.py), checked against the installed openai SDK.

Pure functions are tested directly; the SDK's own client then reads the translated answers and streams from a
real HTTP server on 127.0.0.1, and talks to the native fake (tests/fake_responses.py).
"""
from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest
from openai._models import construct_type
from openai.types import responses as R
from openai.types.responses import Response, ResponseStreamEvent

from errors import BadRequestError
from providers.responses_chat import BadChatAnswerError, StreamTranslator, UntranslatableError, from_chat, sse, to_chat
from tests.fake_responses import FakeResponses
from tests.gateway import sdk_http

RID = "resp_abc123"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}, "strict": True}
EVENT_CLASSES = {
    "response.created": R.ResponseCreatedEvent, "response.in_progress": R.ResponseInProgressEvent,
    "response.output_item.added": R.ResponseOutputItemAddedEvent,
    "response.content_part.added": R.ResponseContentPartAddedEvent,
    "response.output_text.delta": R.ResponseTextDeltaEvent, "response.output_text.done": R.ResponseTextDoneEvent,
    "response.refusal.delta": R.ResponseRefusalDeltaEvent, "response.refusal.done": R.ResponseRefusalDoneEvent,
    "response.content_part.done": R.ResponseContentPartDoneEvent,
    "response.output_item.done": R.ResponseOutputItemDoneEvent,
    "response.function_call_arguments.delta": R.ResponseFunctionCallArgumentsDeltaEvent,
    "response.function_call_arguments.done": R.ResponseFunctionCallArgumentsDoneEvent,
    "response.completed": R.ResponseCompletedEvent, "response.incomplete": R.ResponseIncompleteEvent,
    "response.failed": R.ResponseFailedEvent,
}


# ---------------------------------------------------------------------------------------------- to_chat


def test_string_input_is_one_user_message() -> None:
    assert to_chat({"model": "m", "input": "Hi there"}) == {
        "model": "m", "messages": [{"role": "user", "content": "Hi there"}]}


def test_full_request_translates_every_supported_field() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    body = {
        "model": "gemini-flash", "instructions": "Be brief.",
        "input": [
            {"role": "developer", "content": "Answer in French."},
            {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "Sys "},
                                                              {"type": "input_text", "text": "two"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                         {"type": "input_image", "image_url": "https://example.com/a.png",
                                          "detail": "low"},
                                         {"type": "input_image", "image_url": "data:image/png;base64,iVBO"}]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "A cat.", "annotations": []}]},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [WEATHER, {"type": "function", "name": "noop", "parameters": None, "strict": None}],
        "tool_choice": {"type": "function", "name": "get_weather"}, "parallel_tool_calls": False,
        "max_output_tokens": 300, "temperature": 0.2, "top_p": 0.9, "user": "u-42",
        "metadata": {"trace": "t1"}, "text": {"format": {"type": "json_schema", "name": "A", "schema": schema,
                                                          "strict": True}},
        "reasoning": {"effort": "low"}, "stream": True, "store": False, "background": False,
        "previous_response_id": None, "include": [], "truncation": "disabled",
    }
    original = copy.deepcopy(body)
    assert to_chat(body) == {
        "model": "gemini-flash", "temperature": 0.2, "top_p": 0.9, "user": "u-42",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": "Answer in French."},
            {"role": "system", "content": "Sys two"},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                    "parameters": WEATHER["parameters"], "strict": True}},
                  {"type": "function", "function": {"name": "noop"}}],
        "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 300,
        "response_format": {"type": "json_schema", "json_schema": {"name": "A", "schema": schema, "strict": True}},
        "reasoning_effort": "low",
        "stream": True, "stream_options": {"include_usage": True},
    }
    assert body == original  # the caller's body is not changed
    chat = to_chat(body)
    chat["tools"][0]["function"]["parameters"]["properties"].clear()
    assert body == original  # nor by later changes to the translation


def test_tool_history_becomes_assistant_tool_calls_and_tool_messages() -> None:
    chat = to_chat({"model": "m", "input": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "21"}, {"type": "input_text", "text": "C"}]},
        {"type": "function_call", "call_id": "call_3", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_3", "output": "?"},
    ]})
    assert chat["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "21C"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_3", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_3", "content": "?"},
    ]


@pytest.mark.parametrize(("fmt", "expected"), [
    ({"type": "text"}, None),
    ({"type": "json_object"}, {"type": "json_object"}),
    ({"type": "json_schema", "name": "X", "description": "d", "schema": {"type": "object"}},
     {"type": "json_schema", "json_schema": {"name": "X", "description": "d", "schema": {"type": "object"}}}),
])
def test_text_formats(fmt: dict, expected: dict | None) -> None:
    chat = to_chat({"model": "m", "input": "x", "text": {"format": fmt}})
    assert chat.get("response_format") == expected


@pytest.mark.parametrize(("choice", "expected"), [
    ("none", "none"), ("auto", "auto"), ("required", "required"),
    ({"type": "function", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_weather"}]},
     {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
         {"type": "function", "function": {"name": "get_weather"}}]}}),
])
def test_tool_choice(choice: Any, expected: Any) -> None:
    assert to_chat({"model": "m", "input": "x", "tools": [WEATHER], "tool_choice": choice})["tool_choice"] == expected


def test_parallel_tool_calls_only_sent_with_tools() -> None:
    # Chat upstreams reject parallel_tool_calls when no tools are given.
    assert "parallel_tool_calls" not in to_chat({"model": "m", "input": "x", "parallel_tool_calls": True})


def test_metadata_is_not_sent_upstream_but_echoed() -> None:
    body = {"model": "m", "input": "x", "metadata": {"k": "v"}}
    assert "metadata" not in to_chat(body)
    doc = from_chat(_chat_doc("ok"), body, RID, 1700000000)
    assert doc["metadata"] == {"k": "v"}


def _msg(*parts: dict, role: str = "user") -> dict:
    return {"model": "m", "input": [{"role": role, "content": list(parts)}]}


_TEXT = {"type": "input_text", "text": "hi"}
REFUSALS = [
    ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"model": "m", "input": "x", "tools": [WEATHER, {"type": "file_search", "vector_store_ids": ["vs"]}]},
     "tools[1].type"),
    ({"model": "m", "input": "x", "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]},
     "tools[0].type"),
    ({"model": "m", "input": "x", "tools": [{"type": "computer_use_preview"}]}, "tools[0].type"),
    ({"model": "m", "input": "x", "tools": [{"type": "mcp", "server_label": "s"}]}, "tools[0].type"),
    ({"model": "m", "input": "x", "tools": [{"type": "image_generation"}]}, "tools[0].type"),
    ({"model": "m", "input": "x", "tools": [{**WEATHER, "defer_loading": True}]}, "tools[0].defer_loading"),
    ({"model": "m", "input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"model": "m", "input": "x", "store": True}, "store"),
    ({"model": "m", "input": "x", "background": True}, "background"),
    ({"model": "m", "input": "x", "conversation": "conv_1"}, "conversation"),
    ({"model": "m", "input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"model": "m", "input": "x", "include": ["reasoning.encrypted_content"]}, "include[0]"),
    ({"model": "m", "input": "x", "reasoning": {"effort": "low", "summary": "auto"}}, "reasoning.summary"),
    ({"model": "m", "input": "x", "truncation": "auto"}, "truncation"),
    ({"model": "m", "input": "x", "top_logprobs": 3}, "top_logprobs"),
    ({"model": "m", "input": "x", "max_tool_calls": 2}, "max_tool_calls"),
    ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "m", "input": "x", "modalities": ["audio"]}, "modalities"),
    ({"model": "m", "input": "x", "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ({"model": "m", "input": "x", "instructions": ["not", "a", "string"]}, "instructions"),
    ({"model": "m", "input": []}, "input"),
    ({"model": "m"}, "input"),
    (_msg(_TEXT, {"type": "input_file", "file_id": "file_1"}), "input[0].content[1].type"),
    (_msg({"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}), "input[0].content[0].type"),
    (_msg({"type": "input_image", "file_id": "file_1", "detail": "auto"}), "input[0].content[0].file_id"),
    (_msg({"type": "input_image", "image_url": "https://e.com/a.png", "detail": "original"}),
     "input[0].content[0].detail"),
    (_msg({"type": "input_image", "image_url": "https://e.com/a.png"}, role="system"), "input[0].content[0]"),
    (_msg({"type": "output_text", "text": "x"}, {"type": "input_image", "image_url": "u"}, role="assistant"),
     "input[0].content[1]"),
    ({"model": "m", "input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"model": "m", "input": [{"role": "user", "content": "x"}, {"type": "reasoning", "id": "rs_1", "summary": []}]},
     "input[1].type"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"model": "m", "input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
    ({"model": "m", "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    ({"model": "m", "input": "x", "stream_options": {"include_usage": True}}, "stream_options.include_usage"),
    ({"model": "m", "input": "x", "stream_options": "yes"}, "stream_options"),
]


@pytest.mark.parametrize(("body", "param"), REFUSALS, ids=[p for _, p in REFUSALS])
def test_untranslatable_fields_are_refused_naming_the_field(body: dict, param: str) -> None:
    with pytest.raises(UntranslatableError) as info:
        to_chat(body)
    err = info.value
    assert err.param == param
    assert isinstance(err, ValueError) and isinstance(err, BadRequestError) and err.status == 400
    doc = err.body()["error"]
    assert doc["param"] == param and doc["type"] == "invalid_request_error"
    assert doc["code"] == "unsupported_parameter" and doc["message"]


def test_harmless_settings_are_accepted() -> None:
    chat = to_chat({"model": "m", "input": "x", "store": False, "background": False, "include": None,
                    "stream_options": {"include_obfuscation": False}, "reasoning": {"effort": None},
                    "text": {"format": {"type": "text"}, "verbosity": "low"}})
    assert chat == {"model": "m", "messages": [{"role": "user", "content": "x"}], "verbosity": "low"}


# ---------------------------------------------------------------------------------------------- from_chat


def _chat_doc(content: str | None, finish: str = "stop", tool_calls: list | None = None,
              usage: dict | None = None, refusal: str | None = None) -> dict:
    msg: dict[str, Any] = {"role": "assistant", "content": content, "refusal": refusal}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    doc = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "upstream-name",
           "choices": [{"index": 0, "message": msg, "finish_reason": finish}]}
    if usage is not None:
        doc["usage"] = usage
    return doc


USAGE = {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52,
         "prompt_tokens_details": {"cached_tokens": 32}, "completion_tokens_details": {"reasoning_tokens": 5}}
RESP_USAGE = {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 32, "cache_write_tokens": 0},
              "output_tokens": 12,
              "output_tokens_details": {"reasoning_tokens": 5}, "total_tokens": 52}
CALLS = [{"id": "call_A", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
         {"id": "call_B", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]


def test_from_chat_text_answer() -> None:
    request = {"model": "gemini-flash", "input": "hi", "instructions": "Be brief.", "temperature": 0.5,
               "max_output_tokens": 99, "user": "u1"}
    doc = from_chat(_chat_doc("Bonjour!", usage=USAGE), request, RID, 1700000000, completed_at=1700000003)
    assert doc["output"] == [{"id": "msg_abc123", "type": "message", "role": "assistant", "status": "completed",
                              "content": [{"type": "output_text", "text": "Bonjour!", "annotations": [],
                                           "logprobs": []}]}]
    assert doc["usage"] == RESP_USAGE
    assert (doc["id"], doc["object"], doc["status"], doc["created_at"], doc["completed_at"]) == (
        RID, "response", "completed", 1700000000, 1700000003)
    assert doc["model"] == "gemini-flash"  # the name the client asked for, not the upstream's
    resp = Response.model_validate(doc)
    assert resp.output_text == "Bonjour!"
    assert resp.usage is not None and resp.usage.input_tokens_details.cached_tokens == 32
    assert resp.usage.output_tokens_details.reasoning_tokens == 5
    assert (resp.instructions, resp.temperature, resp.max_output_tokens, resp.user) == ("Be brief.", 0.5, 99, "u1")
    assert (resp.tool_choice, resp.tools, resp.parallel_tool_calls, resp.incomplete_details) == ("auto", [], True, None)


def test_from_chat_tool_calls() -> None:
    request = {"model": "m", "input": "x", "tools": [WEATHER], "tool_choice": "required"}
    doc = from_chat(_chat_doc(None, "tool_calls", CALLS), request, RID, 1)
    assert doc["output"] == [
        {"id": "fc_abc123_0", "type": "function_call", "status": "completed", "call_id": "call_A",
         "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"id": "fc_abc123_1", "type": "function_call", "status": "completed", "call_id": "call_B",
         "name": "get_weather", "arguments": '{"city":"Rome"}'},
    ]
    resp = Response.model_validate(doc)
    assert [o.type for o in resp.output] == ["function_call", "function_call"]
    assert resp.tools[0].type == "function" and resp.tools[0].name == "get_weather"
    assert resp.tool_choice == "required"
    # Text and a call together: a message item first, then the call, as the Responses API orders them.
    both = from_chat(_chat_doc("Checking.", "tool_calls", CALLS[:1]), request, RID, 1)
    assert [o["type"] for o in both["output"]] == ["message", "function_call"]
    assert Response.model_validate(both).output_text == "Checking."


@pytest.mark.parametrize(("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")])
def test_from_chat_cut_answer_is_incomplete(finish: str, reason: str) -> None:
    doc = from_chat(_chat_doc("Half an ans", finish), {"model": "m", "input": "x", "max_output_tokens": 3}, RID, 1)
    assert (doc["status"], doc["incomplete_details"], doc["output"][0]["status"]) == (
        "incomplete", {"reason": reason}, "incomplete")
    assert doc["completed_at"] is None
    assert Response.model_validate(doc).status == "incomplete"


def test_from_chat_refusal_and_missing_usage() -> None:
    doc = from_chat(_chat_doc(None, refusal="I can't help with that."), {"model": "m", "input": "x"}, RID, 1)
    assert doc["output"][0]["content"] == [{"type": "refusal", "refusal": "I can't help with that."}]
    assert doc["usage"] is None
    assert Response.model_validate(doc).output[0].content[0].type == "refusal"


def test_from_chat_json_schema_echo_parses() -> None:
    text = {"format": {"type": "json_schema", "name": "A", "schema": {"type": "object"}, "strict": True}}
    doc = from_chat(_chat_doc('{"a": 1}'), {"model": "m", "input": "x", "text": text}, RID, 1)
    resp = Response.model_validate(doc)
    assert resp.text is not None and resp.text.format.type == "json_schema"
    assert json.loads(resp.output_text) == {"a": 1}


@pytest.mark.parametrize("doc", [{}, {"choices": []}, {"choices": ["x"]}, {"error": {"message": "boom"}}])
def test_from_chat_without_choices_is_a_bad_answer(doc: dict) -> None:
    with pytest.raises(BadChatAnswerError):
        from_chat(doc, {"model": "m", "input": "x"}, RID, 1)


# ---------------------------------------------------------------------------------------------- streams


def _chunk(delta: dict | None = None, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "up",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}


def _usage_chunk(usage: dict) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "up", "choices": [],
            "usage": usage}


def _run(request: dict, chunks: list[dict], finish: bool = True) -> list[dict]:
    tr = StreamTranslator(request, RID, 1700000000)
    events = tr.start()
    for c in chunks:
        events += tr.feed(json.loads(json.dumps(c)))
    if finish:
        events += tr.finish(completed_at=1700000002)
    return events


def _check_sdk_types(events: list[dict]) -> None:
    """Every event validates as its SDK class, and the SDK's discriminated union picks that class."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for e in events:
        cls = EVENT_CLASSES[e["type"]]
        cls.model_validate(e)
        assert type(construct_type(type_=ResponseStreamEvent, value=e)) is cls


TEXT_CHUNKS = [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hel"}), _chunk({"content": "lo"}),
               _chunk({"content": "!"}), _chunk(finish="stop"), _usage_chunk(USAGE)]


def test_stream_text_events() -> None:
    request = {"model": "m", "input": "hi", "stream": True}
    events = _run(request, TEXT_CHUNKS)
    _check_sdk_types(events)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    where = {"item_id": "msg_abc123", "output_index": 0, "content_index": 0}
    assert [e["delta"] for e in events[4:7]] == ["Hel", "lo", "!"]
    assert all({k: e[k] for k in where} == where for e in events[3:9])
    assert events[7]["text"] == "Hello!"
    final = events[-1]["response"]
    # The streamed answer ends as the same Response as the non-streamed translation of the same answer.
    assert final == from_chat(_chat_doc("Hello!", usage=USAGE), request, RID, 1700000000, completed_at=1700000002)
    assert Response.model_validate(final).output_text == "Hello!"


def test_stream_tool_call_events() -> None:
    request = {"model": "m", "input": "x", "tools": [WEATHER], "stream": True}
    chunks = [
        _chunk({"role": "assistant", "content": "Checking."}),
        _chunk({"tool_calls": [{"index": 0, "id": "call_A", "type": "function",
                                "function": {"name": "get_weather", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        _chunk({"tool_calls": [{"index": 1, "id": "call_B", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]}),
        _chunk(finish="tool_calls"), _usage_chunk(USAGE),
    ]
    events = _run(request, chunks)
    _check_sdk_types(events)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    added = events[8]
    assert added["output_index"] == 1 and added["item"]["call_id"] == "call_A" and added["item"]["arguments"] == ""
    assert [e["delta"] for e in events[9:11]] == ['{"city":', '"Paris"}']
    assert events[9]["item_id"] == "fc_abc123_0" and events[12]["output_index"] == 2
    assert events[13]["arguments"] == '{"city":"Paris"}' and events[15]["arguments"] == '{"city":"Rome"}'
    final = events[-1]["response"]
    assert final == from_chat(_chat_doc("Checking.", "tool_calls", CALLS, USAGE), request, RID, 1700000000,
                              completed_at=1700000002)


def test_stream_arguments_before_name_are_kept() -> None:
    events = _run({"model": "m", "input": "x"}, [
        _chunk({"tool_calls": [{"index": 0, "id": "call_A", "function": {"arguments": '{"a":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "1}"}}]}),
        _chunk(finish="tool_calls")])
    _check_sdk_types(events)
    assert [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"] == ['{"a":1}']
    assert events[-1]["response"]["output"][0]["arguments"] == '{"a":1}'


def test_stream_length_ends_incomplete() -> None:
    events = _run({"model": "m", "input": "x", "max_output_tokens": 2},
                  [_chunk({"content": "Half"}), _chunk(finish="length"), _usage_chunk(USAGE)])
    _check_sdk_types(events)
    last = events[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["status"] == "incomplete" and last["response"]["usage"] == RESP_USAGE


def test_stream_refusal_and_empty_answer() -> None:
    events = _run({"model": "m", "input": "x"}, [_chunk({"refusal": "No."}), _chunk(finish="stop")])
    _check_sdk_types(events)
    assert [e["type"] for e in events][4:7] == ["response.refusal.delta", "response.refusal.done",
                                                "response.content_part.done"]
    assert events[-1]["response"]["output"][0]["content"] == [{"type": "refusal", "refusal": "No."}]
    empty = _run({"model": "m", "input": "x"}, [_chunk(finish="stop")])
    _check_sdk_types(empty)
    assert empty[-1]["response"] == from_chat(_chat_doc(""), {"model": "m", "input": "x"}, RID, 1700000000,
                                              completed_at=1700000002)


def test_stream_cut_or_failed_upstream_ends_failed() -> None:
    request = {"model": "m", "input": "x"}
    cut = _run(request, [_chunk({"content": "Hel"})])  # no finish_reason: the upstream hung up
    _check_sdk_types(cut)
    assert [e["type"] for e in cut][4:] == ["response.output_text.delta", "response.output_text.done",
                                            "response.content_part.done", "response.output_item.done",
                                            "response.failed"]
    assert cut[-1]["response"]["error"]["code"] == "server_error"
    assert cut[-1]["response"]["output"][0]["status"] == "incomplete"
    tr = StreamTranslator(request, RID, 1)
    events = tr.feed(_chunk({"content": "a"})) + tr.fail("Upstream said 429.", "rate_limit_exceeded")
    _check_sdk_types(events)
    assert events[0]["type"] == "response.created"  # feed starts the stream if start() was not called
    assert events[-1]["response"]["error"] == {"code": "rate_limit_exceeded", "message": "Upstream said 429."}
    assert tr.feed(_chunk({"content": "late"})) == [] and tr.finish() == [] and tr.fail("again") == []


def test_stream_error_event_from_upstream_ends_failed() -> None:
    tr = StreamTranslator({"model": "m", "input": "x"}, RID, 1)
    events = tr.feed(_chunk({"content": "a"}))
    events += tr.feed({"error": {"message": "Fake failure mid-stream.", "type": "server_error"}})
    _check_sdk_types(events)
    assert tr.done and events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {
        "code": "server_error", "message": "The upstream failed mid-stream: Fake failure mid-stream."}
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "a"
    assert tr.finish() == []


def test_sse_framing() -> None:
    event = {"type": "response.output_text.delta", "sequence_number": 4, "delta": "é\n"}
    data = sse(event)
    assert data.startswith(b"event: response.output_text.delta\ndata: ") and data.endswith(b"\n\n")
    assert json.loads(data.split(b"data: ", 1)[1]) == event


# ---------------------------------------------------------------------------------------------- the SDK's client


class _Canned(BaseHTTPRequestHandler):
    """POST answers with whatever the test put in server.reply: a dict as JSON, a list of events as SSE."""

    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        reply = self.server.reply
        if isinstance(reply, dict):
            data, ctype = json.dumps(reply).encode(), "application/json"
        else:
            data, ctype = b"".join(sse(e) for e in reply), "text/event-stream"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def canned() -> Iterator[Any]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    server.daemon_threads = True
    server.bodies = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)  # shutdown() waits a poll
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _client(base_url: str, key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10, http_client=sdk_http())


def test_sdk_reads_translated_answer(canned: Any) -> None:
    request = {"model": "m", "input": "hi", "tools": [WEATHER]}
    canned.reply = from_chat(_chat_doc("Sure.", "tool_calls", CALLS[:1], USAGE), request, RID, 1)
    resp = _client(f"http://127.0.0.1:{canned.server_address[1]}/v1").responses.create(
        model="m", input="hi", tools=[WEATHER])
    assert resp.output_text == "Sure."
    call = resp.output[1]
    assert call.type == "function_call" and call.call_id == "call_A" and json.loads(call.arguments) == {
        "city": "Paris"}
    assert resp.usage is not None and resp.usage.total_tokens == 52


def test_sdk_stream_helper_accumulates_translated_events(canned: Any) -> None:
    request = {"model": "m", "input": "x", "tools": [WEATHER], "stream": True}
    chunks = [_chunk({"content": "Let me look. "}),
              _chunk({"tool_calls": [{"index": 0, "id": "call_A", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city":'}}]}),
              _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
              _chunk(finish="tool_calls"), _usage_chunk(USAGE)]
    canned.reply = _run(request, chunks)
    client = _client(f"http://127.0.0.1:{canned.server_address[1]}/v1")
    deltas, arg_snapshots = [], []
    with client.responses.stream(model="m", input="x", tools=[WEATHER]) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type == "response.function_call_arguments.delta":
                arg_snapshots.append(event.snapshot)
        final = stream.get_final_response()
    assert deltas == ["Let me look. "] and arg_snapshots == ['{"city":', '{"city":"Paris"}']
    assert final.output_text == "Let me look. "
    call = final.output[1]
    assert call.type == "function_call" and call.parsed_arguments == {"city": "Paris"}  # strict tool: parsed
    assert final.usage is not None and final.usage.input_tokens_details.cached_tokens == 32
    assert canned.bodies[0]["stream"] is True


# ---------------------------------------------------------------------------------------------- the native fake


@pytest.fixture
def fake_responses() -> Iterator[FakeResponses]:
    with FakeResponses("sk-native") as fake:
        yield fake


def test_native_fake_plain(fake_responses: FakeResponses) -> None:
    client = _client(fake_responses.base_url, "sk-native")
    resp = client.responses.create(model="gpt-x", input="hi [usage=50,9] [cached=40] [reasoning=4]",
                                   instructions="Be brief.")
    assert resp.output_text == "Hello from Responses" and resp.status == "completed"
    assert [o.type for o in resp.output] == ["reasoning", "message"]
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (50, 9, 59)
    assert resp.usage.input_tokens_details.cached_tokens == 40
    assert resp.usage.output_tokens_details.reasoning_tokens == 4
    sent = fake_responses.requests[-1]
    assert sent["path"] == "/v1/responses" and sent["headers"]["authorization"] == "Bearer sk-native"
    assert sent["body"]["instructions"] == "Be brief."


def test_native_fake_stream_text_and_tool(fake_responses: FakeResponses) -> None:
    client = _client(fake_responses.base_url, "sk-native")
    with client.responses.stream(model="gpt-x", input="hi [chunks=4] [cached=2] [reasoning=1]") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["Hello ", "from ", "Responses", "!"] and final.output_text == "Hello from Responses!"
    assert final.usage is not None and final.usage.output_tokens == 5
    assert final.usage.input_tokens_details.cached_tokens == 2
    assert final.usage.output_tokens_details.reasoning_tokens == 1
    with client.responses.stream(model="gpt-x", input="go [tool=get_weather]", tools=[WEATHER]) as stream:
        final = stream.get_final_response()
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.parsed_arguments == {"city": "Paris"}


def test_native_fake_raw_sse_names_each_event(fake_responses: FakeResponses) -> None:
    client = _client(fake_responses.base_url, "sk-native")
    raw = client.responses.with_raw_response.create(model="gpt-x", input="hi [chunks=2] [incomplete]", stream=True)
    text = raw.http_response.read().decode()
    frames = [f for f in text.split("\n\n") if f.strip()]
    types = []
    for frame in frames:
        event_line, data_line = frame.split("\n")
        doc = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {doc['type']}"
        EVENT_CLASSES[doc["type"]].model_validate(doc)
        types.append(doc["type"])
    assert types[0] == "response.created" and types[-1] == "response.incomplete"
    assert types.count("response.output_text.delta") == 2


def test_native_fake_checks_the_key_and_errors(fake_responses: FakeResponses) -> None:
    with pytest.raises(openai.AuthenticationError):
        _client(fake_responses.base_url, "sk-wrong").responses.create(model="gpt-x", input="hi")
    with pytest.raises(openai.RateLimitError):
        _client(fake_responses.base_url, "sk-native").responses.create(model="gpt-x", input="[error429]")
    with pytest.raises(openai.BadRequestError) as info:
        _client(fake_responses.base_url, "sk-native").responses.create(model="gpt-x", input=None)  # type: ignore
    assert info.value.body["param"] == "input"  # type: ignore[index]
