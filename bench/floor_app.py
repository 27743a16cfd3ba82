"""The stack's floor, for the benchmark's peers step: what gunicorn and Flask cost before the gateway does anything.

    BENCH_FLOOR=stack|upstream gunicorn -c gunicorn.conf.py --pythonpath bench 'floor_app:create_app()'

It is the gateway's own app (same gunicorn settings, worker class, hooks and URL map) with one more
before_request hook, put first, that answers POST /v1/chat/completions itself:

- stack: reads the JSON body (as every route does) and returns a fixed chat completion;
- upstream: sends the body to the configured OpenAI upstream through providers/http.post (the pooled keep-alive
  connection every provider call uses) and returns the upstream's body.

No key, limit, hold, settlement or log line: the figures bound from below what any gateway built on this stack
can cost per request. Never served to users; bench/run.py starts it beside the real gateway.
"""
from __future__ import annotations

import os

from flask import Flask, Response, request

from app import create_app as gateway_app

ANSWER = (b'{"id":"chatcmpl-floor","object":"chat.completion","created":1,"model":"gpt-4.1-mini","choices":[{"index"'
          b':0,"message":{"role":"assistant","content":"Hello from the bench upstream!"},"finish_reason":"stop"}],'
          b'"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}')


def create_app() -> Flask:
    mode = os.environ.get("BENCH_FLOOR", "")
    if mode not in ("stack", "upstream"):
        raise SystemExit("bench/floor_app.py: set BENCH_FLOOR to stack or upstream")
    app = gateway_app()
    upstream = app.config["GATEWAY"].upstreams["openai"]
    url = upstream.base_url.rstrip("/") + "/chat/completions"
    auth = {"Authorization": f"Bearer {upstream.api_key()}"}

    def floor() -> Response | None:
        if request.path != "/v1/chat/completions":
            return None
        body = request.get_json()
        if mode == "stack":
            return Response(ANSWER, 200, {"Content-Type": "application/json"})
        from providers import http  # the worker's own import, after gevent has patched

        reply = http.post(upstream, url, body, auth)
        return Response(reply.content, reply.status_code, {"Content-Type": "application/json"})

    app.before_request_funcs.setdefault(None, []).insert(0, floor)
    return app
