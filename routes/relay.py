"""The streamed chat relay: a provider's ChatEvents to the client's SSE, with heartbeats, settled however it ends."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import gevent
from gevent.queue import Empty, Queue

import billing
import metrics
import tokens
from config import ModelConfig, UpstreamConfig
from errors import GatewayError, UpstreamError
from providers.base import ChatEvent, ChatStream

_EOF = object()
CONNECTED_AFTER = 0.05  # seconds a stream waits for its first event before sending headers on their own
# Delivered text kept per choice before its front is counted and dropped. Short answers (almost all) are never
# counted in flight, so no tokenizer is loaded for a stream whose usage report arrives; a long one keeps at most
# about this much (plus one event), however long it runs.
FOLD_CHARS = 16_384


class DeliveredText:
    """The text one choice delivered, as its token count so far plus a bounded unconsumed tail.

    Counting the whole text at the end kept every piece of a stream in memory until it ended. Instead, past
    FOLD_CHARS the front of the tail is counted and dropped, cut right before a space that stands between two
    non-space characters: tiktoken's pre-tokenizer always starts a new piece there (" word", " 12", " (..."),
    so counts on either side add up to the count of the whole. A text with no such space (CJK, one long word)
    is cut anywhere once its tail reaches four times FOLD_CHARS; a cut inside a piece can miscount it by a
    token, one cut per 64K characters.
    """

    __slots__ = ("counted", "parts", "size")

    def __init__(self) -> None:
        self.counted = 0
        self.parts: list[str] = []
        self.size = 0

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size > FOLD_CHARS:
            self._fold()

    def _fold(self) -> None:
        text = "".join(self.parts)
        cut = len(text) - 1
        while True:
            cut = text.rfind(" ", 1, cut)
            if cut <= 0 or (not text[cut - 1].isspace() and not text[cut + 1].isspace()):
                break
        if cut <= 0:
            if len(text) < 4 * FOLD_CHARS:
                self.parts = [text]
                return
            cut = len(text) - FOLD_CHARS // 4
        self.counted += tokens.count(text[:cut])
        rest = text[cut:]
        self.parts, self.size = [rest], len(rest)

    def tokens(self) -> int:
        return self.counted + tokens.count("".join(self.parts))


class Relay:
    """Relays a provider's ChatStream to the client as SSE with heartbeats, and settles whatever way it ends.

    A reader greenlet fills a queue so the client side can send `: ping` while the upstream is silent; that
    write is how a vanished client is noticed. Usage reports are held back: the client's usage chunk is
    written after settlement, with the cost really charged, just before `[DONE]`.
    """

    def __init__(self, ticket: billing.Ticket, model: ModelConfig, upstream: UpstreamConfig, stream: ChatStream,
                 exact_prompt: Callable[[], int], client_usage: bool, heartbeat: float) -> None:
        self.ticket, self.model, self.upstream, self.stream = ticket, model, upstream, stream
        self.exact_prompt, self.client_usage, self.heartbeat = exact_prompt, client_usage, heartbeat
        self.usage: billing.Usage | None = None  # the upstream's report, once one was believable
        self.usage_doc: dict | None = None       # that report as the upstream wrote it
        self.charged_usage: billing.Usage | None = None  # what settlement charged tokens for
        self.template: dict | None = None        # id, object, created, model of the stream's events
        self.delivered: dict[int, DeliveredText] = {}  # text written to the client, per choice index

    def _read(self, queue: Queue) -> None:
        try:
            for event in self.stream.events():
                queue.put(event)
            queue.put(_EOF)
            # Past [DONE], the connection can serve the next stream once its remainder is read; run() ends
            # this greenlet if that takes long, and the connection is then closed instead.
            self.stream.finish()
        except GatewayError as exc:
            queue.put(exc)
        except Exception:  # the reader must always wake the relay
            queue.put(UpstreamError(f"The upstream '{self.upstream.name}' broke off the stream."))

    def _event(self, event: ChatEvent) -> tuple[bytes, dict[int, str]] | None:
        """One event as (bytes for the client, the text it delivers per choice), or None to drop it.

        The event is relayed as the upstream sent it unless it carries a usage report: that is held back
        (the client's usage chunk is written at the end, after settlement) and the rest re-serialized.
        """
        if self.template is None:
            self.template = {k: event.doc[k] for k in ("id", "object", "created", "model", "system_fingerprint")
                             if k in event.doc}
        if event.usage_report is None:
            return b"data: " + event.data + b"\n\n", event.texts
        usage = billing.read_usage(event.usage_report)
        if usage is not None:
            self.usage, self.usage_doc = usage, event.usage_report
        obj = dict(event.doc)
        del obj["usage"]
        if not event.choices:
            return None
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n", event.texts

    def _usage_chunk(self) -> bytes:
        """The client's usage chunk: the upstream's report (or the gateway's count) and the cost charged."""
        if self.charged_usage is None:
            return b""
        doc = dict(self.template or {"object": "chat.completion.chunk", "model": self.model.id})
        usage = dict(self.usage_doc) if self.usage_doc is not None and self.usage == self.charged_usage \
            else billing.usage_doc(self.charged_usage)
        doc["choices"] = []
        doc["usage"] = usage
        return b"data: " + billing.dumps_with_cost(doc, usage, self.ticket.charged).encode() + b"\n\n"

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
                    yield b"".join(batch) + self._end()
                    break
                if batch:
                    yield b"".join(batch)
                    self._note(sent)  # only once the write went through: a vanished client raises above
                if failed is not None:
                    raise failed
        except GatewayError as exc:
            status = exc.status
            self._settle(status)  # what was delivered is charged; the client still gets the error
            yield self._failed(exc)
        finally:
            metrics.OPEN_STREAMS.dec()  # metrics hook
            reader.kill(block=True, timeout=2)
            self.stream.close()
            self._settle(status)

    def _end(self) -> bytes:
        """What follows the last event of a stream that ended well (after settlement)."""
        return (self._usage_chunk() if self.client_usage else b"") + b"data: [DONE]\n\n"

    def _failed(self, exc: GatewayError) -> bytes:
        """What ends a stream that failed (after settlement): the usage chunk if asked for, then the error."""
        tail = self._usage_chunk() if self.client_usage else b""
        return tail + b"data: " + json.dumps(exc.body(), separators=(",", ":")).encode() + b"\n\n"

    def _note(self, sent: list[dict[int, str]]) -> None:
        if self.usage is not None:  # a believable report came: it is what settles, so nothing is counted
            return
        for texts in sent:
            for index, text in texts.items():
                delivered = self.delivered.get(index)
                if delivered is None:
                    delivered = self.delivered[index] = DeliveredText()
                delivered.add(text)

    def _settle(self, status: int) -> None:
        """Charge the reported usage when a believable report arrived, else the tokens counted as delivered.

        However the stream ended (finished, cut, timed out, client gone): what reached the client is paid for.
        An upstream that failed before delivering anything costs nothing.
        """
        if self.ticket.settled:
            return
        usage, estimated = self.usage, False
        if usage is None:
            completion = sum(d.tokens() for d in self.delivered.values())
            if status >= 500 and completion == 0:
                self.ticket.settle(status)
                return
            usage, estimated = billing.Usage(self.exact_prompt(), completion), True
        self.charged_usage = usage
        self.ticket.add_usage(self.model, usage, status, estimated=estimated)
        self.ticket.settle(status)
