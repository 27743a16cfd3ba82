"""/v1/chat/completions and /v1/completions: validate, hold, call the upstream (plain or streamed), settle."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import gevent
from flask import Response
from gevent.queue import Empty, Queue

import billing
import db
import metrics
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


# A request that names no output cap holds at most 1/HOLD_SHARE of the key's free balance (but never less than
# its prompt and FLOOR_TOKENS of output), while the cap it sends upstream is what the whole free balance affords.
# Without this, one uncapped request reserved a model's entire max_output_tokens and parallel requests on a small
# key got 402 with most of the balance unspent. What a request costs beyond its hold is taken from the balance at
# settlement, down to zero; the rest is recorded as uncollected (README, Credits).
HOLD_SHARE = 8
FLOOR_TOKENS = 256
# A byte-level BPE token is at least one byte, so a prompt's tokens are at most about three times the
# bytes/3 estimate. While that worst case stays within this share of the balance, the estimate is held.
EXACT_SHARE = 8
# Past this many estimated prompt tokens (about 200 KB of text) exact counting would hold the event loop for
# tens of milliseconds; the hold then assumes the worst case (one token per byte) instead. Below it no single
# text is long enough for tokens.count to fall back to its own estimate.
EXACT_MAX_TOKENS = 66_000


def planner(model: ModelConfig, prompt_tokens: int, mult: int, client_cap: int | None,
            extra: int = 0) -> Callable[[int], tuple[int, int]]:
    """The hold for a token-priced request, as billing.hold's planner: (nano-credits held, output cap to send).

    A client's cap (at most the model's maximum) is held in full, or refused with 402. A request without one
    sends the largest cap the free balance affords (the model's maximum when it can) and holds a share of the
    balance for it. extra is nano-credits held on top (vision bridge calls); mult is n (or best_of).
    """
    prompt_scaled = mult * prompt_tokens * model.input_npm + extra * MILLION
    out_unit = mult * model.output_npm
    limit = model.max_output_tokens if client_cap is None else min(client_cap, model.max_output_tokens)

    def cost(cap: int) -> int:
        return billing.ceil_div(prompt_scaled + cap * out_unit, MILLION)

    def short(balance: int, cap: int, hint: str) -> InsufficientCredits:
        return InsufficientCredits(f"This key has {billing.format_credits(balance)} credits available; this "
                                   f"request needs at least {billing.format_credits(cost(cap))}. {hint}")

    def plan(balance: int) -> tuple[int, int]:
        if client_cap is not None or out_unit == 0:
            if cost(limit) > balance:
                raise short(balance, limit, "Top up the key or lower max_tokens.")
            return cost(limit), limit
        cap = min(limit, (balance * MILLION - prompt_scaled) // out_unit)
        if cap < 1:
            raise short(balance, 1, "Top up the key or send a shorter prompt.")
        return min(cost(cap), max(cost(min(cap, FLOOR_TOKENS)), balance // HOLD_SHARE)), cap
    return plan


def hold_prompt(ticket: Ticket, model: ModelConfig, estimate: int, exact: Callable[[], int], mult: int) -> int:
    """The prompt tokens to hold for: the quick estimate while a threefold miss would not matter to the key,
    else an exact count (or, for a huge prompt, the one-token-per-byte worst case)."""
    worst = billing.token_cost(model, 3 * estimate * mult, 0)
    if worst == 0:
        return estimate
    rows = db.read(ticket.cfg.server.database, "SELECT balance FROM api_keys WHERE id = ?", (ticket.key.id,))
    balance = rows[0][0] if rows else 0
    if worst * EXACT_SHARE <= balance:
        return estimate
    if estimate > EXACT_MAX_TOKENS:
        return 3 * estimate
    return max(exact(), 1)


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
        caps = [body[f] for f in ("max_completion_tokens", "max_tokens") if body.get(f) is not None]
        mult = body.get("n") or 1
    else:
        prompt_tokens = tokens.completion_prompt(body.get("prompt"))
        exact_prompt = partial(tokens.completion_prompt, body.get("prompt"), True)
        caps = [body["max_tokens"]] if body.get("max_tokens") is not None else []
        mult = max(body.get("n") or 1, body.get("best_of") or 1)  # best_of completions are generated and billed
    # One cap: the smaller of the client's, sent upstream in the one field the upstream reads, as held.
    client_cap = min(caps) if caps else None
    prompt_tokens = hold_prompt(ticket, model, prompt_tokens, exact_prompt, mult)
    hold = ticket.take_hold(planner(model, prompt_tokens, mult, client_cap, extra_hold))
    headers = {}
    with ticket.settled_on_error(), vision.holding(images):
        if images:
            body = images.apply(ticket)  # fetches; bridge descriptions, inlined data URLs; charges the bridge calls
            headers = images.headers()
        up_body = dict(body)
        up_body["model"] = model.upstream_model
        up_body.pop("max_tokens", None)
        up_body.pop("max_completion_tokens", None)
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
    choices = doc.get("choices")
    if not isinstance(choices, list):
        raise UpstreamError(f"The upstream '{upstream.name}' answered without 'choices'.")
    _check_choices(upstream, choices, "message")
    usage = billing.read_usage(doc.get("usage"))
    estimated = usage is None
    if usage is None:  # none reported, or not believable: count what is delivered
        usage = billing.Usage(exact_prompt(), sum(tokens.count(_choice_text(c)) for c in choices))
        doc["usage"] = _usage_doc(usage)
    ticket.add(billing.usage_cost(model, usage), 200, prompt_tokens=usage.prompt, completion_tokens=usage.completion,
               estimated=estimated)
    charged = ticket.settle(200)
    return Response(dumps_with_cost(doc, doc["usage"], charged), mimetype="application/json",
                    headers={**ticket.credit_headers(charged), **headers})


def _usage_doc(usage: billing.Usage) -> dict:
    return {"prompt_tokens": usage.prompt, "completion_tokens": usage.completion,
            "total_tokens": usage.prompt + usage.completion}


def _check_choices(upstream: UpstreamConfig, choices: list, part: str) -> None:
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


def _choice_text(choice: Any) -> str:
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


class Relay:
    """Relays an upstream SSE stream to the client with heartbeats, and settles whatever way it ends.

    A reader greenlet fills a queue so the client side can send `: ping` while the upstream is silent; that
    write is how a vanished client is noticed. Usage reports are held back: the client's usage chunk is
    written after settlement, with the cost really charged, just before `[DONE]`.
    """

    def __init__(self, ticket: Ticket, model: ModelConfig, upstream: UpstreamConfig, resp: Any,
                 exact_prompt: Callable[[], int], client_usage: bool, heartbeat: float) -> None:
        self.ticket, self.model, self.upstream, self.resp = ticket, model, upstream, resp
        self.exact_prompt, self.client_usage, self.heartbeat = exact_prompt, client_usage, heartbeat
        self.usage: billing.Usage | None = None  # the upstream's report, once one was believable
        self.usage_doc: dict | None = None       # that report as the upstream wrote it
        self.charged_usage: billing.Usage | None = None  # what settlement charged tokens for
        self.template: dict | None = None        # id, object, created, model of the stream's events
        self.delivered: dict[int, list[str]] = {}  # text written to the client, per choice index

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

    def _event(self, data: bytes) -> tuple[bytes, list] | None:
        """One upstream event as (bytes for the client, its choices), or None to drop it; notes usage and errors.

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
        choices = obj.get("choices")
        if choices is not None and not isinstance(choices, list):
            raise UpstreamError(f"The upstream '{self.upstream.name}' sent an event whose 'choices' is not an array.")
        _check_choices(self.upstream, choices or [], "delta")
        if self.template is None:
            self.template = {k: obj[k] for k in ("id", "object", "created", "model", "system_fingerprint")
                             if k in obj}
        if obj.get("usage") is None:
            return b"data: " + data + b"\n\n", choices or []
        usage = billing.read_usage(obj["usage"])
        if usage is not None:
            self.usage, self.usage_doc = usage, obj["usage"]
        del obj["usage"]  # the client's usage chunk is written at the end, after settlement
        if not choices:
            return None
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n", choices

    def _usage_chunk(self) -> bytes:
        """The client's usage chunk: the upstream's report (or the gateway's count) and the cost charged."""
        if self.charged_usage is None:
            return b""
        doc = dict(self.template or {"object": "chat.completion.chunk", "model": self.model.id})
        usage = dict(self.usage_doc) if self.usage_doc is not None and self.usage == self.charged_usage \
            else _usage_doc(self.charged_usage)
        doc["choices"] = []
        doc["usage"] = usage
        return b"data: " + dumps_with_cost(doc, usage, self.ticket.charged).encode() + b"\n\n"

    def run(self) -> Iterator[bytes]:
        queue: Queue = Queue()
        reader = gevent.spawn(self._read, queue)
        status = 499  # a client that goes away never reaches the end
        metrics.OPEN_STREAMS.inc()  # metrics hook
        first = True
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
                batch, sent, done, failed = [], [], False, None
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
                        batch.append(out[0])
                        sent.append(out[1])
                    if queue.empty():
                        break
                    item = queue.get()
                if first and batch:
                    metrics.TTFT.labels(self.model.id).observe(time.monotonic() - self.ticket.started)  # metrics hook
                    first = False
                if done:
                    # Settle before the client sees the end, so a balance read after [DONE] is already current
                    # and the usage chunk shows what was really charged.
                    self._note(sent)
                    self._settle(200)
                    status = 200
                    yield b"".join(batch) + (self._usage_chunk() if self.client_usage else b"") + b"data: [DONE]\n\n"
                    break
                if batch:
                    yield b"".join(batch)
                    self._note(sent)  # only once the write went through: a vanished client raises above
                if failed is not None:
                    raise failed
        except GatewayError as exc:
            status = exc.status
            self._settle(status)  # what was delivered is charged; the client still gets the error
            tail = self._usage_chunk() if self.client_usage else b""
            yield tail + b"data: " + json.dumps(exc.body(), separators=(",", ":")).encode() + b"\n\n"
        finally:
            metrics.OPEN_STREAMS.dec()  # metrics hook
            reader.kill(block=True, timeout=2)
            self.resp.close()
            self._settle(status)

    def _note(self, sent: list[list]) -> None:
        for choices in sent:
            for choice in choices:
                index = choice.get("index") if isinstance(choice.get("index"), int) else 0
                text = _choice_text(choice)
                if text:
                    self.delivered.setdefault(index, []).append(text)

    def _settle(self, status: int) -> None:
        """Charge the reported usage when a believable report arrived, else the tokens counted as delivered.

        However the stream ended (finished, cut, timed out, client gone): what reached the client is paid for.
        An upstream that failed before delivering anything costs nothing.
        """
        if self.ticket.settled:
            return
        usage, estimated = self.usage, False
        if usage is None:
            completion = sum(tokens.count("".join(parts)) for parts in self.delivered.values())
            if status >= 500 and completion == 0:
                self.ticket.settle(status)
                return
            usage, estimated = billing.Usage(self.exact_prompt(), completion), True
        self.charged_usage = usage
        self.ticket.add(billing.usage_cost(self.model, usage), status, prompt_tokens=usage.prompt,
                        completion_tokens=usage.completion, estimated=estimated)
        self.ticket.settle(status)
