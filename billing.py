"""All money: units and prices, the hold planners, trusted usage, a request's ticket, hold, settle, ledger, audit.

Integer nano-credits only; no float touches money. Routes ask a Ticket for a hold (tokens, images, seconds) and
hand it what the upstream delivered; the cost of it is computed here and nowhere else.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import db
import policies
from errors import GatewayError, InsufficientCreditsError

if TYPE_CHECKING:  # config imports NANO from here; only the type names are needed back
    from config import Config, ModelConfig
    from keys import ApiKey

NANO = 10**9  # nano-credits per credit
MILLION = 1_000_000
# The most credits a key may hold, be given or be topped up with: 10^18 nano-credits, far inside SQLite's signed
# 64-bit integers, so a balance plus its open holds and a ledger sum can never overflow into a REAL.
MAX_CREDITS = 10**9
MAX_NANO = MAX_CREDITS * NANO

# The most tokens one usage report may claim for one side. No model reads or writes this many in one request;
# a larger number is a broken upstream, and trusting it would turn into an absurd (or float-sized) charge.
MAX_REPORTED_TOKENS = 100_000_000

log = logging.getLogger("gateway.billing")
request_log = logging.getLogger("gateway.request")  # one line per settled request


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Usage:
    """Token counts an upstream reported, after checking: cached is part of prompt, reasoning part of completion."""

    prompt: int
    completion: int
    cached: int = 0
    reasoning: int = 0


def _tokens(value: Any) -> int | None:
    """A reported token count, or None for anything but a non-negative integer within MAX_REPORTED_TOKENS."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPORTED_TOKENS:
        return None
    return value


def _detail(obj: Any, field_name: str) -> int:
    """An optional breakdown count; one that is missing or not a sane integer counts as 0 (never as a discount)."""
    value = obj.get(field_name) if isinstance(obj, dict) else None
    return _tokens(value) or 0


def read_usage(obj: Any) -> Usage | None:
    """The one place an upstream's usage report becomes numbers: OpenAI's `usage` or Gemini's `usageMetadata`.

    None when the report is missing or not believable (negative, boolean, float, string, huge): the caller then
    counts the delivered content instead and marks the row estimated. Cached tokens are clamped to the prompt,
    so they can only ever lower the input price of tokens that were really sent.
    """
    if not isinstance(obj, dict):
        return None
    if "input_tokens" in obj and "prompt_tokens" not in obj:
        # The Responses API's usage (and the audio endpoints'): input/output tokens with their details.
        obj = {"prompt_tokens": obj.get("input_tokens"), "completion_tokens": obj.get("output_tokens", 0),
               "prompt_tokens_details": obj.get("input_tokens_details") or obj.get("input_token_details"),
               "completion_tokens_details": obj.get("output_tokens_details")}
    if "promptTokenCount" in obj:  # Gemini: thoughts are billed as output on top of the candidates
        prompt = _tokens(obj.get("promptTokenCount"))
        candidates = _tokens(obj.get("candidatesTokenCount", 0))
        thoughts = _tokens(obj.get("thoughtsTokenCount", 0))
        if prompt is None or candidates is None or thoughts is None:
            return None
        return Usage(prompt, candidates + thoughts, min(_detail(obj, "cachedContentTokenCount"), prompt), thoughts)
    prompt = _tokens(obj.get("prompt_tokens"))
    completion = _tokens(obj.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    cached = min(_detail(obj.get("prompt_tokens_details"), "cached_tokens"), prompt)
    reasoning = min(_detail(obj.get("completion_tokens_details"), "reasoning_tokens"), completion)
    return Usage(prompt, completion, cached, reasoning)


def token_cost(model: ModelConfig, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
    """Exact cost in nano-credits, rounded up to a whole nano-credit; never negative.

    cached_tokens are the part of prompt_tokens the upstream served from its cache, charged at the model's
    cached input price (its input price when it has none).
    """
    prompt_tokens, completion_tokens = max(prompt_tokens, 0), max(completion_tokens, 0)
    cached_tokens = min(max(cached_tokens, 0), prompt_tokens)
    return ceil_div((prompt_tokens - cached_tokens) * model.input_npm + cached_tokens * model.cached_npm
                    + completion_tokens * model.output_npm, MILLION)


def usage_cost(model: ModelConfig, usage: Usage) -> int:
    return token_cost(model, usage.prompt, usage.completion, usage.cached)


def format_credits(nano: int) -> str:
    """A plain decimal with at most 9 places: 15600 -> '0.0000156', 5*10**9 -> '5'."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO)
    text = f"{whole}.{frac:09d}".rstrip("0").rstrip(".")
    return sign + text


def parse_credits(text: str | int | Decimal) -> int:
    """Credits written as a decimal ('0.5', '10') to nano-credits; refuses negatives, sub-nano precision and
    more than MAX_CREDITS. The ValueError's text completes "AMOUNT credits ..." style sentences for the CLI."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number of credits") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"{text!r} must be zero or more credits")
    if value > MAX_CREDITS:
        raise ValueError(f"{text!r} is more than the {MAX_CREDITS} credits a key can hold")
    nano = value * NANO
    if nano != nano.to_integral_value():
        raise ValueError(f"{text!r} has more than 9 decimal places")
    return int(nano)


@dataclass
class Hold:
    id: int
    key_id: int
    request_id: str
    amount: int
    plan: Any = None  # what the planner decided (for example the output cap it could afford)


@dataclass
class Charge:
    """One usage row to write at settlement; a request may settle several (a vision bridge call, the main call)."""

    route: str
    model: str
    cost: int
    status: int
    request_id: str
    parent_request_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    units: float = 0
    estimated: bool = False
    latency_ms: int = 0
    uncollected: int = field(default=0, init=False)


# Tickets of this process holding credits now. With none but the caller's, no other request's hold or settlement
# can join a write's group commit, so db.write need not yield to gather them (one connection: a trip round the
# event loop per write saved).
_in_flight = [0]


def hold(path: str, key_id: int, request_id: str, planner: Callable[[int], tuple[int, Any]],
         room: Callable[[sqlite3.Connection], tuple[int, InsufficientCreditsError] | None] | None = None) -> Hold:
    """Reserve credits before any upstream call: planner(balance) -> (amount, plan), or raises InsufficientCreditsError.

    The planner runs inside the write transaction, so the balance it sees is the balance it debits. room (a
    spending cap, policies.cap_room) lowers what the planner may use and names the cap in the 402.
    """
    def work(conn: sqlite3.Connection) -> Hold:
        row = conn.execute("SELECT balance FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        balance = row[0] if row else 0
        capped = room(conn) if room is not None else None  # policy hook: spending caps
        available = balance if capped is None else min(balance, capped[0])
        try:
            amount, plan = planner(available)
            if amount > available:
                raise InsufficientCreditsError("This key does not have enough credits for this request.")
        except InsufficientCreditsError as exc:
            if capped is not None and capped[0] < balance:
                raise capped[1] from None
            raise _with_reserved(conn, key_id, exc) from None
        conn.execute("UPDATE api_keys SET balance = balance - ? WHERE id = ?", (amount, key_id))
        host, boot, started = owner()
        cur = conn.execute(
            "INSERT INTO holds(key_id, request_id, pid, pid_started, host, boot_id, amount, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key_id, request_id, db.pid(), started, host, boot, amount, time.time()))
        return Hold(cur.lastrowid, key_id, request_id, amount, plan)
    return db.write(path, work, gather=_in_flight[0] > 0)


def _with_reserved(conn: sqlite3.Connection, key_id: int, exc: InsufficientCreditsError) -> InsufficientCreditsError:
    """The 402 with what the key's requests in flight hold: those credits come back as they finish."""
    count, held = conn.execute("SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM holds WHERE key_id = ?",
                               (key_id,)).fetchone()
    if not count:
        return exc
    what = "1 request" if count == 1 else f"{count} requests"
    return InsufficientCreditsError(f"{exc.message} Another {format_credits(held)} credits are reserved by {what} in "
                               "flight; what they do not spend comes back when they finish, so retry then.")


def settle(path: str, h: Hold, charges: list[Charge]) -> int | None:
    """Charge what the request really cost and return the rest of its hold. Returns the new balance, or None
    when the hold was already settled or released (then nothing is written, so a retry is always safe).

    A cost above the hold is taken from the balance down to zero; what cannot be collected is recorded on the
    last usage row, so the balance never goes negative and no charge is lost from the books.
    """
    for c in charges:
        c.cost = max(c.cost, 0)  # a cost is never negative, whatever its inputs were

    def work(conn: sqlite3.Connection) -> int | None:
        now = time.time()
        for c in charges:
            c.uncollected = 0  # a retry after a rolled-back attempt starts over
        if conn.execute("DELETE FROM holds WHERE id = ?", (h.id,)).rowcount != 1:
            return None  # already settled, or released
        total = sum(c.cost for c in charges)
        if total <= h.amount:
            (balance,) = conn.execute("UPDATE api_keys SET balance = balance + ? WHERE id = ? RETURNING balance",
                                      (h.amount - total, h.key_id)).fetchone()
        else:
            (balance,) = conn.execute("SELECT balance FROM api_keys WHERE id = ?", (h.key_id,)).fetchone()
            taken = min(balance, total - h.amount)
            balance -= taken
            conn.execute("UPDATE api_keys SET balance = ? WHERE id = ?", (balance, h.key_id))
            charges[-1].uncollected = total - h.amount - taken
        for c in charges:
            conn.execute(
                "INSERT INTO usage(request_id, parent_request_id, key_id, route, model, prompt_tokens,"
                " completion_tokens, units, estimated, cost, uncollected, status, latency_ms, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (c.request_id, c.parent_request_id, h.key_id, c.route, c.model, c.prompt_tokens,
                 c.completion_tokens, c.units, int(c.estimated), c.cost, c.uncollected, c.status,
                 c.latency_ms, now))
            conn.execute("INSERT INTO ledger(key_id, amount, kind, request_id, created_at)"
                         " VALUES (?, ?, 'charge', ?, ?)", (h.key_id, -(c.cost - c.uncollected), c.request_id, now))
        return balance
    return db.write(path, work, gather=_in_flight[0] > 0)


def release(path: str, h: Hold) -> bool:
    """Return a whole hold to its key and write nothing else: the last resort when settle() keeps failing."""
    def work(conn: sqlite3.Connection) -> bool:
        if conn.execute("DELETE FROM holds WHERE id = ?", (h.id,)).rowcount != 1:
            return False
        conn.execute("UPDATE api_keys SET balance = balance + ? WHERE id = ?", (h.amount, h.key_id))
        return True
    return db.write(path, work)


def release_orphans(path: str) -> int:
    """Return to their keys the holds whose owning process is gone; run at worker start, never by the CLI.

    A hold is an orphan only when it was taken on this host (same hostname) and its owner is provably gone: the
    machine rebooted since (another boot_id), or no process has its pid, or the process with that pid started
    at another time (the pid was reused), or it is a zombie. Holds of another host are never touched: its pids
    say nothing here. Age alone never frees a hold, since a live stream may run for hours.
    """
    def work(conn: sqlite3.Connection) -> int:
        host, boot, _ = owner()
        rows = conn.execute("SELECT id, key_id, amount, pid, pid_started, host, boot_id FROM holds").fetchall()
        released = 0
        for hold_id, key_id, amount, pid, started, hold_host, hold_boot in rows:
            if hold_host is None:  # taken before holds recorded their owner: the pid is all there is
                if _alive(pid, None):
                    continue
            elif hold_host != host or (hold_boot == boot and _alive(pid, started)):
                continue
            conn.execute("DELETE FROM holds WHERE id = ?", (hold_id,))
            conn.execute("UPDATE api_keys SET balance = balance + ? WHERE id = ?", (amount, key_id))
            released += 1
        return released
    return db.write(path, work)


def stale_holds(conn: sqlite3.Connection, older_than: float) -> list[tuple[int, int, str, int, str, float]]:
    """Holds open longer than any request can run: (id, key_id, request_id, pid, host, age in seconds)."""
    now = time.time()
    rows = conn.execute("SELECT id, key_id, request_id, pid, host, created_at FROM holds WHERE created_at < ?"
                        " ORDER BY id", (now - older_than,)).fetchall()
    return [(r[0], r[1], r[2], r[3], r[4] or "", now - r[5]) for r in rows]


_owner: tuple[int, tuple[str, str, int]] | None = None


def owner() -> tuple[str, str, int]:
    """(hostname, boot_id, start time of this process in clock ticks since boot): who a hold belongs to."""
    global _owner
    pid = db.pid()
    if _owner is None or _owner[0] != pid:  # read once per process (a fork gets its own)
        _owner = (pid, (socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), _start_time(pid)))
    return _owner[1]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None when there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else 0  # field 22 of stat, counted from the pid


def _alive(pid: int, started: int | None) -> bool:
    """Whether the process that took a hold can still settle it: same pid, same start time, not a zombie."""
    fields = _stat(pid)
    if fields is None:
        if os.path.isdir("/proc/self"):
            return False
        try:  # no /proc (not Linux): the pid alone is all there is to go on
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    if fields[0] in (b"Z", b"X"):
        return False
    return not started or len(fields) <= 19 or int(fields[19]) == started


def credit(conn: sqlite3.Connection, key_id: int, amount: int, kind: str) -> None:
    """Add credits to a key with its ledger row, inside the caller's transaction."""
    conn.execute("UPDATE api_keys SET balance = balance + ? WHERE id = ?", (amount, key_id))
    conn.execute("INSERT INTO ledger(key_id, amount, kind, created_at) VALUES (?, ?, ?, ?)",
                 (key_id, amount, kind, time.time()))


def audit(conn: sqlite3.Connection) -> list[tuple[int, int, int, int]]:
    """Keys whose balance plus open holds differs from the sum of their ledger: (id, balance, held, ledger)."""
    rows = conn.execute("""
        SELECT k.id, k.balance, COALESCE(h.total, 0), COALESCE(l.total, 0)
        FROM api_keys k
        LEFT JOIN (SELECT key_id, SUM(amount) AS total FROM holds GROUP BY key_id) h ON h.key_id = k.id
        LEFT JOIN (SELECT key_id, SUM(amount) AS total FROM ledger GROUP BY key_id) l ON l.key_id = k.id
        ORDER BY k.id""").fetchall()
    return [tuple(r) for r in rows if r[1] + r[2] != r[3]]


def correct(conn: sqlite3.Connection, key_id: int, amount: int, reason: str) -> int:
    """Take amount nano-credits from a key's balance as a 'correction' ledger row with the operator's reason, in
    its own transaction; returns the new balance. LookupError for an unknown key, ValueError (writing nothing)
    for an empty reason or more than the free balance (open holds are not the operator's to take)."""
    reason = (reason or "").strip()
    if not reason:
        raise ValueError("a correction needs a reason")
    if amount <= 0:
        raise ValueError("a correction takes more than 0 credits")
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT balance FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise LookupError(f"no key with id {key_id}")
        if amount > row[0]:
            raise ValueError(f"key {key_id} has {format_credits(row[0])} credits free; a correction can take at "
                             "most that")
        conn.execute("UPDATE api_keys SET balance = balance - ? WHERE id = ?", (amount, key_id))
        conn.execute("INSERT INTO ledger(key_id, amount, kind, created_at, reason) VALUES (?, ?, 'correction', ?, ?)",
                     (key_id, -amount, time.time(), reason[:500]))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return row[0] - amount


def spend_by_day(conn: sqlite3.Connection, days: int, key_id: int | None = None,
                 now: float | None = None) -> list[tuple[str, int]]:
    """Nano-credits charged per UTC day for the last `days` days, oldest first, every day present."""
    now = time.time() if now is None else now
    today = int(now // 86400) * 86400
    since = today - (days - 1) * 86400
    where, args = ("AND key_id = ?", (since, key_id)) if key_id is not None else ("", (since,))
    rows = conn.execute(f"SELECT CAST(created_at / 86400 AS INTEGER) AS d, SUM(cost - uncollected) FROM usage"
                        f" WHERE created_at >= ? {where} GROUP BY d", args).fetchall()
    totals = {int(r[0]): int(r[1]) for r in rows}
    out = []
    for i in range(days):
        day = since // 86400 + i
        out.append((time.strftime("%Y-%m-%d", time.gmtime(day * 86400)), totals.get(day, 0)))
    return out


# --- Hold planners: what a request reserves before its upstream call -----------------------------------------

# A request that names no output cap holds at most 1/HOLD_SHARE of the key's free balance (but never less than
# its prompt and FLOOR_TOKENS of output), while the cap it sends upstream is what the whole free balance affords.
# Without this, one uncapped request reserved a model's entire max_output_tokens and parallel requests on a small
# key got 402 with most of the balance unspent. What a request costs beyond its hold is taken from the balance at
# settlement, down to zero; the rest is recorded as uncollected (docs/billing.md).
HOLD_SHARE = 8
FLOOR_TOKENS = 256
# A byte-level BPE token is at least one byte, so a prompt's tokens are at most about three times the
# bytes/3 estimate. While that worst case stays within this share of the balance, the estimate is held.
EXACT_SHARE = 8
# Past this many estimated prompt tokens (about 200 KB of text) exact counting would hold the event loop for
# tens of milliseconds; the hold then assumes the worst case (one token per byte) instead. Below it no single
# text is long enough for tokens.count to fall back to its own estimate.
EXACT_MAX_TOKENS = 66_000


def token_planner(model: ModelConfig, prompt_tokens: int, mult: int, client_cap: int | None,
                  extra: int = 0) -> Callable[[int], tuple[int, int]]:
    """The hold for a token-priced request, as hold()'s planner: (nano-credits held, output cap to send).

    A client's cap (at most the model's maximum) is held in full, or refused with 402. A request without one
    sends the largest cap the free balance affords (the model's maximum when it can) and holds a share of the
    balance for it. extra is nano-credits held on top (vision bridge calls); mult is n (or best_of).
    """
    prompt_scaled = mult * prompt_tokens * model.input_npm + extra * MILLION
    out_unit = mult * model.output_npm
    limit = model.max_output_tokens if client_cap is None else min(client_cap, model.max_output_tokens)

    def cost(cap: int) -> int:
        return ceil_div(prompt_scaled + cap * out_unit, MILLION)

    def short(balance: int, cap: int, hint: str) -> InsufficientCreditsError:
        return InsufficientCreditsError(f"This key has {format_credits(balance)} credits available; this "
                                        f"request needs at least {format_credits(cost(cap))}. {hint}")

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


def prompt_tokens_to_hold(model: ModelConfig, balance: int, estimate: int, exact: Callable[[], int],
                          mult: int) -> int:
    """The prompt tokens to hold for: the quick estimate while a threefold miss would not matter to the key,
    else an exact count (or, for a huge prompt, the one-token-per-byte worst case)."""
    worst = token_cost(model, 3 * estimate * mult, 0)
    if worst == 0 or worst * EXACT_SHARE <= balance:
        return estimate
    if estimate > EXACT_MAX_TOKENS:
        return 3 * estimate
    return max(exact(), 1)


def images_cost(model: ModelConfig, count: int) -> int:
    return count * model.image_nano


def seconds_cost(model: ModelConfig, seconds: float) -> int:
    """seconds x the per-second price in nano-credits, rounded up to a whole nano-credit; exact decimal math."""
    exact = Decimal(str(seconds)) * model.second_nano
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def chars_cost(model: ModelConfig, chars: int) -> int:
    """Characters at the model's price per million characters, rounded up to a whole nano-credit."""
    return ceil_div(max(chars, 0) * model.char_npm, MILLION)


def duration_cost(model: ModelConfig, seconds: float) -> int:
    """Seconds of audio at per_second plus per_minute / 60, exact decimal math, rounded up to a nano-credit."""
    exact = Decimal(str(max(seconds, 0))) * (model.second_nano + Decimal(model.minute_nano) / 60)
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def token_priced(model: ModelConfig) -> bool:
    return bool(model.input_npm or model.output_npm)


def duration_priced(model: ModelConfig) -> bool:
    return bool(model.second_nano or model.minute_nano)


# A transcription is held for before its duration is known, from the file's size: at least this many bytes per
# second (16 kbit/s, below what speech codecs are used at), so the hold is rarely under the real length.
AUDIO_BYTES_PER_SECOND = 2000
# Token-priced transcription holds: audio input tokens and transcript tokens per second of that estimate
# (OpenAI's audio models read about 10 tokens a second; speech is about 3 words a second).
AUDIO_TOKENS_PER_SECOND = 10
TRANSCRIPT_TOKENS_PER_SECOND = 4


def transcription_hold(model: ModelConfig, file_bytes: int) -> tuple[int, float]:
    """(nano-credits to hold, estimated seconds) for an audio file of file_bytes bytes."""
    seconds = max(1, ceil_div(file_bytes, AUDIO_BYTES_PER_SECOND))
    cost = duration_cost(model, seconds)
    if token_priced(model):
        cost += token_cost(model, seconds * AUDIO_TOKENS_PER_SECOND, seconds * TRANSCRIPT_TOKENS_PER_SECOND)
    return cost, float(seconds)


def bridge_call_hold(bridge: ModelConfig, prompt_tokens: int, max_tokens: int) -> int:
    """Nano-credits held per vision bridge call: its prompt estimate and its full output cap."""
    return token_cost(bridge, prompt_tokens, max_tokens)


def fixed(amount: int, what: str, hint: str) -> Callable[[int], tuple[int, None]]:
    """A hold planner for a known price: the amount, or 402 saying what the key has and what `what` needs."""
    def plan(balance: int) -> tuple[int, None]:
        if amount > balance:
            raise InsufficientCreditsError(f"This key has {format_credits(balance)} credits; {what} need "
                                           f"{format_credits(amount)}. Top up the key or {hint}.")
        return amount, None
    return plan


def balance_of(path: str, key_id: int) -> int:
    rows = db.read(path, "SELECT balance FROM api_keys WHERE id = ?", (key_id,))
    return rows[0][0] if rows else 0


# --- The cost written into an answer ------------------------------------------------------------------------

_COST = "\x00cost\x00"
_COST_JSON = json.dumps(_COST)


def dumps_with_cost(doc: Any, usage: dict | None, nano: int) -> str:
    """JSON text of doc with usage.cost written as a plain decimal number (never a float)."""
    if usage is None:
        return json.dumps(doc, separators=(",", ":"))
    usage["cost"] = _COST
    return json.dumps(doc, separators=(",", ":")).replace(_COST_JSON, format_credits(nano), 1)


def usage_doc(usage: Usage) -> dict:
    """OpenAI's usage object for counts the gateway made itself (no report, or one that was not believable)."""
    return {"prompt_tokens": usage.prompt, "completion_tokens": usage.completion,
            "total_tokens": usage.prompt + usage.completion}


# --- The request's ticket -------------------------------------------------------------------------------------

class _ExactNeeded(Exception):
    """Raised inside a hold's transaction when its prompt must be counted exactly first (Ticket.hold_tokens)."""


def _exact_needed() -> int:
    raise _ExactNeeded


SETTLE_ATTEMPTS = 3
SETTLE_RETRY_SECONDS = 0.05


@dataclass
class Ticket:
    """What a request holds and owes; settle() runs once, from the view or the stream's finally."""

    cfg: Config
    key: ApiKey
    request_id: str
    route: str
    model: str
    started: float = field(default_factory=time.monotonic)
    hold: Hold | None = None
    charges: list[Charge] = field(default_factory=list)
    balance: int | None = None
    settled: bool = False
    charged: int = 0
    held_at: float = 0.0

    def take_hold(self, planner: Callable[[int], tuple[int, Any]]) -> Hold:
        import metrics  # here, not at the top: config imports billing in gunicorn's master, before gevent patches

        policies.check_model(self.key, self.model)  # policy hook: allowed models (403 before any credit moves)
        self.hold = hold(self.cfg.server.database, self.key.id, self.request_id, planner,
                         policies.cap_room(self.key))  # policy hook: spending caps (402)
        self.held_at = time.monotonic()
        _in_flight[0] += 1
        metrics.hold_taken()  # metrics hook
        return self.hold

    def hold_tokens(self, model: ModelConfig, estimate: int, exact: Callable[[], int], mult: int,
                    client_cap: int | None, extra: int = 0) -> int:
        """Hold for a token-priced request; returns the output cap to send upstream.

        The balance that decides between the estimate and an exact count is the one the hold's transaction
        reads (no read of its own before it). An exact count is never made inside the transaction, where it
        would keep every other writer waiting: the rare request that needs one gives up that transaction,
        counts, and holds again.
        """
        if token_cost(model, 3 * estimate * mult, 0) == 0:
            return self.take_hold(token_planner(model, estimate, mult, client_cap, extra)).plan

        def plan(balance: int) -> tuple[int, int]:
            prompt = prompt_tokens_to_hold(model, balance, estimate, _exact_needed, mult)
            return token_planner(model, prompt, mult, client_cap, extra)(balance)
        try:
            return self.take_hold(plan).plan
        except _ExactNeeded:
            return self.take_hold(token_planner(model, max(exact(), 1), mult, client_cap, extra)).plan

    def hold_images(self, model: ModelConfig, n: int) -> None:
        self.take_hold(fixed(images_cost(model, n), f"{n} image(s) from {model.id}", "ask for fewer images (n)"))

    def hold_fixed(self, amount: int, what: str, hint: str) -> None:
        """Hold a known amount, or 402 saying what the key has and what `what` needs."""
        self.take_hold(fixed(amount, what, hint))

    def hold_seconds(self, model: ModelConfig, seconds: float, shown: int | float) -> None:
        self.take_hold(fixed(seconds_cost(model, seconds), f"{shown} s of music from {model.id}",
                             "ask for a shorter duration_seconds"))

    def add(self, cost: int, status: int, *, model: str | None = None, prompt_tokens: int = 0,
            completion_tokens: int = 0, units: float = 0, estimated: bool = False,
            request_id: str | None = None, parent: str | None = None) -> Charge:
        """Record one usage row to be written at settlement."""
        charge = Charge(
            route=self.route, model=model or self.model, cost=cost, status=status,
            request_id=request_id or self.request_id, parent_request_id=parent,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, units=units,
            estimated=estimated, latency_ms=int((time.monotonic() - self.started) * 1000))
        self.charges.append(charge)
        return charge

    def add_usage(self, model: ModelConfig, usage: Usage, status: int, *, estimated: bool = False,
                  request_id: str | None = None, parent: str | None = None) -> Charge:
        """A token-priced row: the usage's cost at the model's prices."""
        return self.add(usage_cost(model, usage), status, model=model.id,
                        prompt_tokens=usage.prompt, completion_tokens=usage.completion, estimated=estimated,
                        request_id=request_id, parent=parent)

    def add_images(self, model: ModelConfig, count: int) -> Charge:
        return self.add(images_cost(model, count), 200, units=count)

    def add_chars(self, model: ModelConfig, chars: int) -> Charge:
        return self.add(chars_cost(model, chars), 200, units=chars)

    def add_duration(self, model: ModelConfig, seconds: float, *, estimated: bool = False) -> Charge:
        return self.add(duration_cost(model, seconds), 200, units=seconds, estimated=estimated)

    def add_seconds(self, model: ModelConfig, seconds: float) -> Charge:
        return self.add(seconds_cost(model, seconds), 200, units=seconds)

    def settle(self, status: int) -> int:
        """Write the charges (a failed request with none records one free row) and return the cost charged.

        Marked settled only once the books say so. A settlement that keeps failing is retried, then the whole
        hold is returned with nothing charged; only if even that fails does the hold stay open, and then the
        log says so (the next worker start returns it, and `flask audit` lists it).
        """
        if self.settled or self.hold is None:
            return self.charged
        import metrics

        if not any(c.request_id == self.request_id for c in self.charges):
            self.add(0, status)
        _in_flight[0] -= 1
        metrics.hold_ended()  # metrics hook: settled, released or left open, it is no longer in flight here
        database = self.cfg.server.database
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                self.balance = settle(database, self.hold, self.charges)
                break
            except Exception as exc:  # sqlite3.Error, a full disk, ...: the transaction was rolled back
                request_log.error("request_id=%s settlement attempt %d failed: %s", self.request_id, attempt + 1,
                                  exc)
                if attempt + 1 < SETTLE_ATTEMPTS:
                    import gevent  # only here: config imports this module in gunicorn's master, before patching
                    gevent.sleep(SETTLE_RETRY_SECONDS * (attempt + 1))
        else:
            self.settled = True
            self.charged = 0
            try:
                returned = release(database, self.hold)
            except Exception as exc:
                request_log.error("request_id=%s hold %s stays open (%s): it is returned when this worker is "
                                  "gone, and `flask audit` lists it", self.request_id, self.hold.id, exc)
                return 0
            request_log.error("request_id=%s could not be settled; its hold %s was %s and nothing was charged",
                              self.request_id, self.hold.id, "returned" if returned else "already gone")
            return 0
        self.settled = True
        if self.balance is None:  # the hold was already gone: nothing was written, so nothing was charged
            request_log.error("request_id=%s found its hold %s already returned; nothing was charged",
                              self.request_id, self.hold.id)
            return 0
        main = self.charges[-1]
        self.charged = sum(c.cost - c.uncollected for c in self.charges)
        metrics.record_settlement(self.route, self.model, time.monotonic() - self.held_at,  # metrics hook
                                  sum(c.prompt_tokens for c in self.charges),
                                  sum(c.completion_tokens for c in self.charges), self.charged)
        request_log.info("request_id=%s key=%s route=%s model=%s status=%s prompt_tokens=%s completion_tokens=%s "
                         "units=%s cost=%s uncollected=%s latency_ms=%s", self.request_id, self.key.prefix,
                         self.route, self.model, status, main.prompt_tokens, main.completion_tokens, main.units,
                         format_credits(self.charged), format_credits(main.uncollected), main.latency_ms)
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
        headers = {"x-credits-charged": format_credits(max(charged, 0))}
        if self.balance is not None:
            headers["x-credits-remaining"] = format_credits(self.balance)
        return headers
