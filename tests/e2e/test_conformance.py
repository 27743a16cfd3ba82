"""The gateway's responses checked against OpenAI's published schemas (tests/conformance, copied from the spec)."""
from __future__ import annotations

import json

import requests

from tests.conformance.validate import validate


def _post(gateway, secret, path, body, stream=False):
    return requests.post(f"{gateway.base_url}/{path}", headers={"Authorization": f"Bearer {secret}"}, json=body,
                         stream=stream)


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_models(gateway, key):
    auth = {"Authorization": f"Bearer {key[1]}"}
    assert validate("ListModelsResponse", requests.get(f"{gateway.base_url}/models", headers=auth).json()) == []
    assert validate("Model", requests.get(f"{gateway.base_url}/models/gpt-test", headers=auth).json()) == []


def test_chat_plain_and_stream(gateway, key):
    r = _post(gateway, key[1], "chat/completions",
              {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]})
    assert validate("CreateChatCompletionResponse", r.json()) == []
    r = _post(gateway, key[1], "chat/completions", {"model": "gpt-test", "stream": True,
                                                    "stream_options": {"include_usage": True},
                                                    "messages": [{"role": "user", "content": "x"}]})
    events = _events(r.text)
    assert len(events) >= 6
    for event in events:
        assert validate("CreateChatCompletionStreamResponse", event) == [], event


def test_completions_plain_and_stream(gateway, key):
    r = _post(gateway, key[1], "completions", {"model": "gpt-test", "prompt": "x"})
    assert validate("CreateCompletionResponse", r.json()) == []
    r = _post(gateway, key[1], "completions", {"model": "gpt-test", "prompt": "x", "stream": True})
    events = _events(r.text)
    assert events
    for event in events:
        assert validate("CreateCompletionResponse", event) == [], event


def test_errors(gateway, key):
    bodies = [
        requests.get(f"{gateway.base_url}/models", headers={"Authorization": "Bearer sk-x"}).json(),
        requests.get(f"{gateway.base_url}/models/nope", headers={"Authorization": f"Bearer {key[1]}"}).json(),
        _post(gateway, key[1], "chat/completions", {"model": "gpt-test"}).json(),
        _post(gateway, key[1], "chat/completions", {"model": "gpt-test",
                                                    "messages": [{"role": "user", "content": "[error500]"}]}).json(),
        requests.delete(f"{gateway.base_url}/models", headers={"Authorization": f"Bearer {key[1]}"}).json(),
    ]
    for body in bodies:
        assert validate("ErrorResponse", body) == [], body
    r = _post(gateway, key[1], "chat/completions", {"model": "gpt-test", "stream": True,
                                                    "messages": [{"role": "user", "content": "[midstream-error]"}]})
    errors = [e for e in _events(r.text) if "error" in e]
    assert len(errors) == 1 and validate("ErrorResponse", errors[0]) == []
