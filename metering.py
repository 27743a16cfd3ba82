"""One request's bill: the hold taken for it, the charges it settles once, and its log line."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import gevent

import billing
import metrics
import policies
from config import Config
from errors import GatewayError
from keys import ApiKey

log = logging.getLogger("gateway.request")
_COST = "\x00cost\x00"
_COST_JSON = json.dumps(_COST)
SETTLE_ATTEMPTS = 3
SETTLE_RETRY_SECONDS = 0.05


def dumps_with_cost(doc: Any, usage: dict | None, nano: int) -> str:
    """JSON text of doc with usage.cost written as a plain decimal number (never a float)."""
    if usage is None:
        return json.dumps(doc, separators=(",", ":"))
    usage["cost"] = _COST
    return json.dumps(doc, separators=(",", ":")).replace(_COST_JSON, billing.format_credits(nano), 1)


@dataclass
class Ticket:
    """What a request holds and owes; settle() runs once, from the view or the stream's finally."""

    cfg: Config
    key: ApiKey
    request_id: str
    route: str
    model: str
    started: float = field(default_factory=time.monotonic)
    hold: billing.Hold | None = None
    charges: list[billing.Charge] = field(default_factory=list)
    balance: int | None = None
    settled: bool = False
    charged: int = 0
    held_at: float = 0.0

    def take_hold(self, planner: Any) -> billing.Hold:
        policies.check_model(self.key, self.model)  # policy hook: allowed models (403 before any credit moves)
        self.hold = billing.hold(self.cfg.server.database, self.key.id, self.request_id, planner,
                                 policies.cap_room(self.key))  # policy hook: spending caps (402)
        self.held_at = time.monotonic()
        metrics.HOLDS.inc()  # metrics hook
        return self.hold

    def add(self, cost: int, status: int, *, model: str | None = None, prompt_tokens: int = 0,
            completion_tokens: int = 0, units: float = 0, estimated: bool = False,
            request_id: str | None = None, parent: str | None = None) -> billing.Charge:
        """Record one usage row to be written at settlement."""
        charge = billing.Charge(
            route=self.route, model=model or self.model, cost=cost, status=status,
            request_id=request_id or self.request_id, parent_request_id=parent,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, units=units,
            estimated=estimated, latency_ms=int((time.monotonic() - self.started) * 1000))
        self.charges.append(charge)
        return charge

    def settle(self, status: int) -> int:
        """Write the charges (a failed request with none records one free row) and return the cost charged.

        Marked settled only once the books say so. A settlement that keeps failing is retried, then the whole
        hold is returned with nothing charged; only if even that fails does the hold stay open, and then the
        log says so (the next worker start returns it, and `flask audit` lists it).
        """
        if self.settled or self.hold is None:
            return self.charged
        if not any(c.request_id == self.request_id for c in self.charges):
            self.add(0, status)
        metrics.HOLDS.dec()  # metrics hook: settled, released or left open, it is no longer in flight here
        database = self.cfg.server.database
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                self.balance = billing.settle(database, self.hold, self.charges)
                break
            except Exception as exc:  # sqlite3.Error, a full disk, ...: the transaction was rolled back
                log.error("request_id=%s settlement attempt %d failed: %s", self.request_id, attempt + 1, exc)
                if attempt + 1 < SETTLE_ATTEMPTS:
                    gevent.sleep(SETTLE_RETRY_SECONDS * (attempt + 1))
        else:
            self.settled = True
            self.charged = 0
            try:
                returned = billing.release(database, self.hold)
            except Exception as exc:
                log.error("request_id=%s hold %s stays open (%s): it is returned when this worker is gone, and "
                          "`flask audit` lists it", self.request_id, self.hold.id, exc)
                return 0
            log.error("request_id=%s could not be settled; its hold %s was %s and nothing was charged",
                      self.request_id, self.hold.id, "returned" if returned else "already gone")
            return 0
        self.settled = True
        if self.balance is None:  # the hold was already gone: nothing was written, so nothing was charged
            log.error("request_id=%s found its hold %s already returned; nothing was charged",
                      self.request_id, self.hold.id)
            return 0
        main = self.charges[-1]
        self.charged = sum(c.cost - c.uncollected for c in self.charges)
        metrics.record_settlement(self.route, self.model, time.monotonic() - self.held_at,  # metrics hook
                                  sum(c.prompt_tokens for c in self.charges),
                                  sum(c.completion_tokens for c in self.charges), self.charged)
        log.info("request_id=%s key=%s route=%s model=%s status=%s prompt_tokens=%s completion_tokens=%s "
                 "units=%s cost=%s uncollected=%s latency_ms=%s", self.request_id, self.key.prefix, self.route,
                 self.model, status, main.prompt_tokens, main.completion_tokens, main.units,
                 billing.format_credits(self.charged), billing.format_credits(main.uncollected), main.latency_ms)
        return self.charged

    @contextmanager
    def settled_on_error(self) -> Iterator[None]:
        """Settle at the failing status (charging only what was added before) when the block raises."""
        try:
            yield
        except GatewayError as exc:
            self.settle(exc.status)
            raise
        except BaseException:
            self.settle(500)
            raise

    def credit_headers(self, charged: int) -> dict[str, str]:
        headers = {"x-credits-charged": billing.format_credits(max(charged, 0))}
        if self.balance is not None:
            headers["x-credits-remaining"] = billing.format_credits(self.balance)
        return headers
