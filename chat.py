"""/v1/chat/completions and /v1/completions: validate, hold, call the upstream (plain or streamed), settle."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import gevent
from flask import Response
from gevent.queue import Empty, Queue

import billing
import tokens
import vision
from config import ModelConfig, UpstreamConfig
from errors import GatewayError, InsufficientCredits, InvalidRequest, UpstreamError
from metering import Ticket, dumps_with_cost
from providers import openai as openai_provider
from providers.http import require_key

MILLION = billing.MILLION
_EOF = object()
CONNECTED_AFTER = 0.05  # seconds a stream waits for its first event before sending headers on their own


def _int_field(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
        bound = f" and at most {high}" if high else ""
        raise InvalidRequest(f"'{name}' must be an integer of at least {low}{bound}.", param=name,
                             code="invalid_value")
    return value


def validate(route: str, body: dict) -> None:
    """OpenAI's required fields and the types of the fields the gateway itself uses."""
    if "model" not in body:
        raise InvalidRequest("You must provide a model parameter.", param="model", code="missing_required_parameter")
    if route == "chat":
        msgs = body.get("messages")
        if msgs is None:
            raise InvalidRequest("Missing required parameter: 'messages'.", param="messages",
                                 code="missing_required_parameter")
        if not isinstance(msgs, list) or not msgs:
            raise InvalidRequest("'messages' must be a non-empty array.", param="messages", code="invalid_type")
        for i, msg in enumerate(msgs):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise InvalidRequest(f"'messages[{i}]' must be an object with a 'role'.", param=f"messages[{i}]",
                                     code="invalid_type")
            content = msg.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise InvalidRequest(f"'messages[{i}].content' must be a string or an array of parts.",
                                     param=f"messages[{i}].content", code="invalid_type")
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt",
                                 code="missing_required_parameter")
        if not isinstance(prompt, (str, list)):
            raise InvalidRequest("'prompt' must be a string or an array.", param="prompt", code="invalid_type")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream", code="invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options", code="invalid_type")
    for name in ("max_tokens", "max_completion_tokens"):
        _int_field(body, name, 1)
    _int_field(body, "n", 1, 128)
    _int_field(body, "best_of", 1, 20)


def planner(model: ModelConfig, prompt_tokens: int, mult: int, client_cap: int | None, extra: int = 0):
    """The hold: prompt estimate x input price + output cap x output price, times n; the cap lowered to what
    the key can afford when the client named none. extra is added nano-credits (vision bridge calls)."""
    prompt_scaled = mult * prompt_tokens * model.input_npm + extra * MILLION
    out_unit = mult * model.output_npm

    def plan(balance: int) -> tuple[int, int]:
        if client_cap is not None:
            cap = min(client_cap, model.max_output_tokens)
        elif out_unit == 0:
            cap = model.max_output_tokens
        else:
            cap = min(model.max_output_tokens, (balance * MILLION - prompt_scaled) // out_unit)
        amount = billing.ceil_div(prompt_scaled + max(cap, 1) * out_unit, MILLION)
        if cap < 1 or amount > balance:
            raise InsufficientCredits(
                f"This key has {billing.format_credits(balance)} credits; this request needs at least "
                f"{billing.format_credits(amount)}. Top up the key or lower max_tokens.")
        return amount, cap
    return plan


def handle(ticket: Ticket, route: str, body: dict, heartbeat: float) -> Response:
    """Run one chat or legacy completion request end to end; the ticket is settled on every path."""
    model, upstream = ticket.cfg.model_for(body["model"], "chat")
    require_key(upstream)  # a missing upstream key is a 502 before any credit moves
    ticket.model = model.id
    stream = bool(body.get("stream"))
    # Images are checked and priced before the hold (a refused image costs nothing) and fetched after it.
    images = vision.plan(ticket.cfg, model, upstream, body, ticket.key.id) if route == "chat" else None
    extra_hold = images.extra_hold if images else 0
    if route == "chat":
        prompt_tokens = tokens.chat_prompt(body)
        exact_prompt = partial(tokens.chat_prompt, body, True)
        cap_field = next((f for f in ("max_completion_tokens", "max_tokens") if body.get(f) is not None), None)
        mult = body.get("n") or 1
    else:
        prompt_tokens = tokens.completion_prompt(body.get("prompt"))
        exact_prompt = partial(tokens.completion_prompt, body.get("prompt"), True)
        cap_field = "max_tokens" if body.get("max_tokens") is not None else None
        mult = max(body.get("n") or 1, body.get("best_of") or 1)  # best_of completions are generated and billed
    client_cap = body[cap_field] if cap_field else None
    hold = ticket.take_hold(planner(model, prompt_tokens, mult, client_cap, extra_hold))
    headers = {}
    with ticket.settled_on_error(), vision.holding(images):
        if images:
            body = images.apply(ticket)  # fetches; bridge descriptions, inlined data URLs; charges the bridge calls
            headers = images.headers()
        up_body = dict(body)
        up_body["model"] = model.upstream_model
        if client_cap is None:
            up_body[upstream.max_tokens_field if route == "chat" else "max_tokens"] = hold.plan
        path = "chat/completions" if route == "chat" else "completions"
        if not stream:
            return _plain(ticket, model, upstream, path, up_body, exact_prompt, headers)
        client_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        up_body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        resp = openai_provider.open_stream(upstream, path, up_body)
    relay = Relay(ticket, model, upstream, resp, exact_prompt, client_usage, heartbeat)
    return Response(relay.run(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})


def _plain(ticket: Ticket, model: ModelConfig, upstream: UpstreamConfig, path: str, up_body: dict,
           exact_prompt: Callable[[], int], headers: dict[str, str]) -> Response:
    doc = openai_provider.call(upstream, path, up_body)
    if not isinstance(doc.get("choices"), list):
        raise UpstreamError(f"The upstream '{upstream.name}' answered without 'choices'.")
    usage = doc.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        prompt, completion, estimated = usage["prompt_tokens"], int(usage.get("completion_tokens") or 0), False
    else:
        prompt, estimated = exact_prompt(), True
        completion = sum(tokens.count(_choice_text(c)) for c in doc["choices"] if isinstance(c, dict))
        usage = doc["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                "total_tokens": prompt + completion}
    cost = billing.token_cost(model, prompt, completion)
    ticket.add(cost, 200, prompt_tokens=prompt, completion_tokens=completion, estimated=estimated)
    charged = ticket.settle(200)
    return Response(dumps_with_cost(doc, usage, charged), mimetype="application/json",
                    headers={**ticket.credit_headers(charged), **headers})


def _choice_text(choice: dict) -> str:
    """The text a choice (or a stream delta) carries, for counting tokens the upstream did not report."""
    if "text" in choice:
        return str(choice.get("text") or "")
    msg = choice.get("message") or choice.get("delta") or {}
    text = str(msg.get("content") or "") + str(msg.get("refusal") or "")
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        text += str(fn.get("name") or "") + str(fn.get("arguments") or "")
    return text


class Relay:
    """Relays an upstream SSE stream to the client with heartbeats, and settles whatever way it ends.

    A reader greenlet fills a queue so the client side can send `: ping` while the upstream is silent; that
    write is how a vanished client is noticed (RUNTIME.md 2.2).
    """

    def __init__(self, ticket: Ticket, model: ModelConfig, upstream: UpstreamConfig, resp: Any,
                 exact_prompt: Callable[[], int], client_usage: bool, heartbeat: float) -> None:
        self.ticket, self.model, self.upstream, self.resp = ticket, model, upstream, resp
        self.exact_prompt, self.client_usage, self.heartbeat = exact_prompt, client_usage, heartbeat
        self.usage: dict | None = None
        self.delivered: list[bytes] = []

    def _read(self, queue: Queue) -> None:
        try:
            for data in openai_provider.iter_events(self.upstream, self.resp):
                queue.put(data)
            queue.put(_EOF)
            # Past [DONE], the connection can serve the next stream once its remainder is read; run() ends
            # this greenlet if that takes long, and the connection is then closed instead.
            self.resp.finish()
        except GatewayError as exc:
            queue.put(exc)
        except Exception:  # the reader must always wake the relay
            queue.put(UpstreamError(f"The upstream '{self.upstream.name}' broke off the stream."))

    def _event(self, data: bytes) -> bytes | None:
        """One upstream event as bytes for the client, or None to drop it; notes usage and upstream errors.

        Every event is parsed (a few microseconds) so a malformed one ends the stream with an error event
        instead of reaching the client's SDK; it is re-serialized only when the gateway changes it.
        """
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise UpstreamError(f"The upstream '{self.upstream.name}' sent an event that is not a JSON object.")
        if obj.get("error") is not None:
            err = obj["error"] if isinstance(obj["error"], dict) else {}
            raise UpstreamError(str(err.get("message") or "The upstream failed mid-stream."))
        usage = obj.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            self.usage = usage
            if self.client_usage:
                cost = billing.token_cost(self.model, usage["prompt_tokens"], int(usage.get("completion_tokens") or 0))
                cost += sum(c.cost for c in self.ticket.charges)  # vision bridge calls, charged before the stream
                return b"data: " + dumps_with_cost(obj, usage, cost).encode() + b"\n\n"
            if not obj.get("choices"):
                return None
            del obj["usage"]
            return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
        return b"data: " + data + b"\n\n"

    def run(self) -> Iterator[bytes]:
        queue: Queue = Queue()
        reader = gevent.spawn(self._read, queue)
        status = 499  # a client that goes away never reaches the end
        try:
            wait, idle = CONNECTED_AFTER, b": connected\n\n"
            while True:
                try:
                    item = queue.get(timeout=wait)
                except Empty:
                    # Headers go out with the first event; an upstream slower than CONNECTED_AFTER gets them
                    # sent with a comment instead, then a ping every heartbeat while it stays silent.
                    yield idle
                    wait, idle = self.heartbeat, b": ping\n\n"
                    continue
                wait, idle = self.heartbeat, b": ping\n\n"
                batch, items, done, failed = [], [], False, None
                while True:  # drain what has arrived, so a burst of events costs one write
                    if item is _EOF:
                        done = True
                        break
                    if isinstance(item, GatewayError):
                        failed = item  # relay what came before it first
                        break
                    try:
                        out = self._event(item)
                    except GatewayError as exc:
                        failed = exc
                        break
                    if out is not None:
                        batch.append(out)
                        items.append(item)
                    if queue.empty():
                        break
                    item = queue.get()
                if done:
                    # Settle before the client sees the end, so a balance read after [DONE] is already current.
                    self.delivered += items
                    self._settle(200)
                    yield b"".join(batch) + b"data: [DONE]\n\n"
                    break
                if batch:
                    yield b"".join(batch)
                    self.delivered += items  # only once the write went through: a vanished client raises above
                if failed is not None:
                    raise failed
        except GatewayError as exc:
            status = exc.status
            yield b"data: " + json.dumps(exc.body(), separators=(",", ":")).encode() + b"\n\n"
        finally:
            reader.kill(block=True, timeout=2)
            self.resp.close()
            self._settle(status)

    def _settle(self, status: int) -> None:
        if self.ticket.settled:
            return
        if status >= 500:
            self.ticket.settle(status)  # a failed upstream call costs nothing
            return
        if self.usage is not None:
            prompt = self.usage["prompt_tokens"]
            completion = int(self.usage.get("completion_tokens") or 0)
            estimated = False
        else:
            prompt, estimated = self.exact_prompt(), True
            completion = 0
            for data in self.delivered:
                try:
                    obj = json.loads(data)
                except ValueError:
                    continue
                for choice in obj.get("choices") or []:
                    completion += tokens.count(_choice_text(choice))
        cost = billing.token_cost(self.model, prompt, completion)
        self.ticket.add(cost, status, prompt_tokens=prompt, completion_tokens=completion, estimated=estimated)
        self.ticket.settle(status)
