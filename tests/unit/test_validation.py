"""validation.py on its own: the typed request each route works from, and one error convention for all."""
from __future__ import annotations

import pytest

import validation
from errors import BadRequestError


def refused(fn, *args) -> BadRequestError:
    with pytest.raises(BadRequestError) as caught:
        fn(*args)
    assert caught.value.status == 400 and caught.value.message.endswith(".")
    return caught.value


def test_text_request_reads_caps_and_multiplier():
    chat = validation.text_request("chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": 50, "max_completion_tokens": 20, "n": 3,
                                            "stream": True, "stream_options": {"include_usage": True}})
    assert (chat.client_cap, chat.mult, chat.stream, chat.client_usage) == (20, 3, True, True)
    legacy = validation.text_request("completions", {"model": "m", "prompt": "x", "max_tokens": 7,
                                                     "max_completion_tokens": 3, "n": 2, "best_of": 5})
    assert (legacy.client_cap, legacy.mult, legacy.stream, legacy.client_usage) == (7, 5, False, False)


@pytest.mark.parametrize("route, body, param, code", [
    ("chat", {"messages": []}, "model", "missing_required_parameter"),
    ("chat", {"model": "m"}, "messages", "missing_required_parameter"),
    ("chat", {"model": "m", "messages": "hi"}, "messages", "invalid_type"),
    ("chat", {"model": "m", "messages": [{"content": "x"}]}, "messages[0]", "invalid_type"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ("chat", {"model": "m", "messages": [{"role": "u"}], "stream": "yes"}, "stream", "invalid_value"),
    ("chat", {"model": "m", "messages": [{"role": "u"}], "stream_options": []}, "stream_options", "invalid_type"),
    ("chat", {"model": "m", "messages": [{"role": "u"}], "n": 129}, "n", "invalid_value"),
    ("chat", {"model": "m", "messages": [{"role": "u"}], "max_tokens": True}, "max_tokens", "invalid_value"),
    ("completions", {"model": "m"}, "prompt", "missing_required_parameter"),
    ("completions", {"model": "m", "prompt": 5}, "prompt", "invalid_type"),
    ("completions", {"model": "m", "prompt": "x", "best_of": 21}, "best_of", "invalid_value"),
])
def test_text_request_errors(route, body, param, code):
    err = refused(validation.text_request, route, body)
    assert (err.param, err.code) == (param, code)
    assert f"'{param}'" in err.message


@pytest.mark.parametrize("body, param, code", [
    ({}, "prompt", "missing_required_parameter"),
    ({"prompt": " "}, "prompt", "invalid_value"),
    ({"prompt": "x", "n": 2.0}, "n", "invalid_value"),
    ({"prompt": "x", "size": "0x5"}, "size", "invalid_size"),
    ({"prompt": "x", "size": "1024X1024"}, "size", "invalid_size"),
    ({"prompt": "x", "response_format": "png"}, "response_format", "invalid_value"),
    ({"prompt": "x", "stream": True}, "stream", "unsupported_value"),
])
def test_images_request_errors(body, param, code):
    err = refused(validation.images_request, body)
    assert (err.param, err.code) == (param, code)


def test_images_request_defaults():
    req = validation.images_request({"prompt": "a cat", "size": "1024x1536"})
    assert (req.prompt, req.n, req.size, req.response_format, req.model) == ("a cat", 1, "1024x1536", None, None)


def test_music_request_clamps_and_defaults():
    req = validation.music_request({"prompt": "lofi", "duration_seconds": 99, "music_generation_config":
                                    {"bpm": 90, "top_k": 5}}, 8.0)
    assert (req.seconds, req.response_format, req.config) == (30.0, "pcm", {"bpm": 90, "topK": 5})
    assert validation.music_request({"prompt": "x", "response_format": "wav"}, 8.0).seconds == 8.0
    assert refused(validation.music_request, {"prompt": "x", "response_format": "mp3"}, 8.0).param \
        == "response_format"
