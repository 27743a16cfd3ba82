"""The in-process tier's premise: without gunicorn there is no gevent monkey patching, and the gateway's gevent
parts (the stream relay's reader greenlet and queue, db.write's group commit on a gevent thread pool) still work
from the main thread, so a stream is relayed whole and settled exactly."""
from __future__ import annotations

from gevent import monkey

NANO = 10**9


def test_a_stream_is_relayed_and_settled_without_monkey_patching(gateway):
    assert not monkey.is_module_patched("socket") and not monkey.is_module_patched("threading")
    key_id, secret = gateway.create_key("1")
    r = gateway.http.post(f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                          json={"model": "gpt-test", "stream": True, "stream_options": {"include_usage": True},
                                "messages": [{"role": "user", "content": "hi [usage=100,50] [chunks=5]"}]})
    assert r.status_code == 200
    # the role chunk, five parts, the finish chunk and the usage chunk
    assert r.text.count("data: {") == 1 + 5 + 1 + 1 and r.text.rstrip().endswith("data: [DONE]")
    [row] = gateway.usage(key_id)
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == (200, 100, 50)
    cost = (100 * 400_000_000 + 50 * 1_600_000_000) // 10**6  # gpt-test: 0.40 and 1.60 per million tokens
    assert row["cost"] == cost and r.headers.get("x-credits-charged") is None  # a stream's cost is in its usage
    assert gateway.balance(key_id) == NANO - cost and gateway.open_holds(key_id) == 0
