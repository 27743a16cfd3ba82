"""Images in chat: passed to vision models, inlined where the upstream cannot fetch, described for text-only models.

chat.handle calls plan() before the hold: every image is checked (data URLs decoded, remote hosts resolved and
checked against safefetch's address rules, whoever will fetch them) and priced at its worst case, so a refusal
costs nothing and reaches no upstream, and nothing is downloaded for a key that cannot pay. Inside the hold,
VisionPlan.apply() fetches remote images within the worker's byte budget, makes the bridge calls (one per
uncached image, concurrently), charges each as its own usage row linked to the request, caches the descriptions
in SQLite by (key, sha256 of the image bytes, bridge model) and returns the body for the main call. The cache is
per key: a shared one would tell a key, through `cached` and a lower charge, that another tenant sent an image.

The response header `x-vision-images: bridged=B; cached=C; inlined=I; passed=P` says what happened:
  bridged  images described by a bridge call made for this request;
  cached   images whose description was already known (the cache, or the same image earlier in the request);
  inlined  remote images the gateway fetched and sent on as base64 data URLs (upstreams that cannot fetch);
  passed   images sent to a vision model as they came.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from gevent.pool import Pool

import billing
import db
import providers
import tokens
from config import Config, ModelConfig, UpstreamConfig
from errors import BadRequestError, GatewayError, UpstreamError
from providers.http import require_key
from safefetch import ByteBudget, ImageRefusedError, Lease, check_url, fetch_image, parse_data_url

log = logging.getLogger("gateway.vision")
_warned_loopback = False

BRIDGE_MAX_TOKENS = 300  # output cap of a bridge call; also what its hold assumes
CONCURRENCY = 8  # fetches or bridge calls in flight at once for one request
# Image bytes one worker's fetches may hold at once, in units of max_image_bytes: each fetch reserves the cap
# before connecting and keeps what it read until the request no longer needs it.
BUDGET_IMAGES = 4
INSTRUCTION = ("Describe this image faithfully for someone who cannot see it. Transcribe any text in it exactly. "
               "Say what is shown: subjects, objects, people, actions, colours, layout, and for charts or tables "
               "the values. Describe only what is visible; do not guess or add commentary. Answer with the "
               "description only.")
_budget: ByteBudget | None = None


@dataclass
class ImageRef:
    """One image part of the request, and what plan() learnt about it."""

    where: str  # messages[i].content[j], for error messages and param
    msg: int
    part: int
    url: str
    remote: bool = False
    data: bytes = b""
    mime: str = ""
    digest: str = ""

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"


@dataclass
class VisionPlan:
    """What plan() decided: extra_hold (nano-credits) for the hold, apply() for the body, headers() for the answer."""

    cfg: Config
    body: dict
    refs: list[ImageRef]
    key_id: int
    bridge: ModelConfig | None = None
    inline: bool = False
    descriptions: dict[str, str] = field(default_factory=dict)  # digest -> description (cache hits, then new)
    extra_hold: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("bridged", "cached", "inlined", "passed"), 0))
    lease: Lease = field(default_factory=Lease)

    def headers(self) -> dict[str, str]:
        return {"x-vision-images": "; ".join(f"{k}={v}" for k, v in self.counts.items())}

    def apply(self, ticket: billing.Ticket) -> dict:
        """The body for the main call: remote images fetched (inside the hold, within the worker's byte budget),
        and for a text-only model the bridge calls made and charged first. Call it inside holding()."""
        changes: dict[tuple[int, int], dict] = {}
        if self.counts["passed"] == len(self.refs):
            return self.body  # a vision model whose upstream fetches URLs: nothing to fetch or describe
        _fetch(self.cfg, [r for r in self.refs if r.remote], self.lease)
        if self.bridge is not None:
            self._look_up()
            self._describe(ticket)
            for ref in self.refs:
                text = f"[Description of an image: {self.descriptions[ref.digest]}]"
                changes[(ref.msg, ref.part)] = {"type": "text", "text": text}
        elif self.inline:
            for ref in self.refs:
                if ref.remote:
                    part = self.body["messages"][ref.msg]["content"][ref.part]
                    old = part["image_url"] if isinstance(part["image_url"], dict) else {}
                    changes[(ref.msg, ref.part)] = {**part, "image_url": {**old, "url": ref.data_url()}}
        if not changes:
            return self.body
        messages = list(self.body["messages"])
        for (i, j), part in changes.items():
            if messages[i] is self.body["messages"][i]:
                messages[i] = {**messages[i], "content": list(messages[i]["content"])}
            messages[i]["content"][j] = part
        return {**self.body, "messages": messages}

    def _look_up(self) -> None:
        """Digests of the fetched images, this key's cached descriptions of them, and the header's counts."""
        assert self.bridge is not None
        for ref in self.refs:
            if ref.remote:
                ref.digest = hashlib.sha256(ref.data).hexdigest()
        self.descriptions.update(_cached(self.cfg, self.key_id, self.bridge.id,
                                         [r.digest for r in self.refs if r.digest not in self.descriptions]))
        misses = {r.digest for r in self.refs if r.digest not in self.descriptions}
        self.counts["bridged"] = len(misses)
        self.counts["cached"] = len(self.refs) - len(misses)

    def _describe(self, ticket: billing.Ticket) -> None:
        """One bridge call per distinct uncached image; successes are charged and cached even if another fails."""
        bridge = self.bridge
        assert bridge is not None
        misses: dict[str, ImageRef] = {}
        for ref in self.refs:
            if ref.digest not in self.descriptions:
                misses.setdefault(ref.digest, ref)
        if not misses:
            return
        upstream = self.cfg.upstream_for(bridge)
        pool = Pool(min(CONCURRENCY, len(misses)))
        results = pool.map(lambda ref: _bridge_call(bridge, upstream, ref), list(misses.values()))
        failure: tuple[ImageRef, GatewayError] | None = None
        fresh: dict[str, str] = {}
        for ref, result in zip(misses.values(), results, strict=True):
            if isinstance(result, GatewayError):
                failure = failure or (ref, result)
                continue
            text, usage, estimated = result
            bridge_id = "req_" + os.urandom(12).hex()
            charge = ticket.add_usage(bridge, usage, 200, estimated=estimated, request_id=bridge_id,
                                      parent=ticket.request_id)
            log.info("vision bridge request_id=%s parent=%s model=%s image=%s prompt_tokens=%s "
                     "completion_tokens=%s cost=%s", bridge_id, ticket.request_id, bridge.id, ref.where,
                     usage.prompt, usage.completion, billing.format_credits(charge.cost))
            fresh[ref.digest] = text
        self.descriptions.update(fresh)
        if fresh:
            _store(self.cfg, self.key_id, bridge.id, fresh)
        if failure:
            ref, exc = failure
            raise UpstreamError(f"vision bridge: the model '{bridge.id}' could not describe the image at "
                                f"{ref.where}, so the request was not sent on: {exc.message}", param=ref.where)


def plan(cfg: Config, model: ModelConfig, upstream: UpstreamConfig, body: dict, key_id: int) -> VisionPlan | None:
    """Check and price every image of a chat body, fetching nothing; None when it has no image.

    Raises 400 on any bad image: a data URL that is not an image, or a remote URL whose host is or resolves to
    an address safefetch refuses (checked here even when the upstream will fetch it, so a local vLLM or Ollama
    cannot be made to fetch 169.254.169.254). extra_hold assumes every image not known to be cached is bridged.
    """
    refs = _find_images(body)
    if not refs:
        return None
    warn_if_loopback(cfg)
    if len(refs) > cfg.vision.max_images:
        raise BadRequestError(f"This request has {len(refs)} images; at most {cfg.vision.max_images} are accepted "
                             "per request.", param="messages", code="too_many_images")
    for ref in refs:
        scheme = ref.url.split(":", 1)[0].strip().lower() if ":" in ref.url else ""
        if scheme == "data":
            try:
                ref.data, ref.mime = parse_data_url(ref.url, max_bytes=cfg.vision.max_image_bytes)
            except ImageRefusedError as exc:
                raise _named(ref, exc) from None
        elif scheme in ("http", "https"):
            ref.remote = True
        else:
            shown = f"scheme '{scheme[:20]}'" if scheme else "a URL without a scheme"
            raise ImageRefusedError(f"{ref.where}: {shown} is not allowed; send an http(s) URL or a "
                               "data:image/<png|jpeg|gif|webp>;base64,... URL.", param=ref.where)
    _check_hosts(cfg, [r for r in refs if r.remote])
    vp = VisionPlan(cfg, body, refs, key_id)
    if model.vision and upstream.fetches_image_urls:
        vp.counts["passed"] = len(refs)
        return vp
    if model.vision:
        vp.inline = True
        vp.counts["inlined"] = sum(r.remote for r in refs)
        vp.counts["passed"] = len(refs) - vp.counts["inlined"]
        return vp
    vp.bridge = _bridge_model(cfg, model)
    for ref in refs:
        if not ref.remote:
            ref.digest = hashlib.sha256(ref.data).hexdigest()
    vp.descriptions = _cached(cfg, key_id, vp.bridge.id, [r.digest for r in refs if not r.remote])
    # Remote images are unknown until fetched, which happens inside the hold: each distinct URL is held as a
    # bridge call, and what the cache or a duplicate saves returns at settlement.
    worst = {r.digest for r in refs if not r.remote and r.digest not in vp.descriptions}
    worst |= {r.url for r in refs if r.remote}
    vp.extra_hold = len(worst) * _bridge_estimate(vp.bridge, cfg.upstream_for(vp.bridge))
    return vp


@contextmanager
def holding(images: VisionPlan | None) -> Iterator[None]:
    """The block in which the request uses its fetched image bytes; they go back to the worker's budget after."""
    try:
        yield
    finally:
        if images is not None and _budget is not None:
            _budget.release(images.lease)


def warn_if_loopback(cfg: Config) -> None:
    """Log, once per process, that image fetches may reach loopback (a test-only setting): at the first request
    with images, so a worker's own log says it too; gunicorn's on_starting says it once at start."""
    global _warned_loopback
    if cfg.vision.allow_loopback_image_hosts and not _warned_loopback:
        _warned_loopback = True
        log.warning("[vision].allow_loopback_image_hosts is ON: clients can make this gateway fetch image URLs "
                    "from 127.0.0.1/::1. This is for tests only; turn it off in production.")


def _find_images(body: dict) -> list[ImageRef]:
    """Every image_url part of every message whose content is an array (the URL an object's url, or a string)."""
    refs = []
    for i, msg in enumerate(body.get("messages") or []):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            where = f"messages[{i}].content[{j}]"
            value = part.get("image_url")
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str) or not url.strip():
                raise ImageRefusedError(f"{where}: 'image_url.url' must be a non-empty string.", param=where)
            refs.append(ImageRef(where, i, j, url))
    return refs


def _named(ref: ImageRef, exc: ImageRefusedError) -> ImageRefusedError:
    return ImageRefusedError(f"{ref.where}: {exc.message}", param=ref.where)


def _check_hosts(cfg: Config, refs: list[ImageRef]) -> None:
    """Every remote URL's host resolved and checked, none connected to; the first refusal in request order."""
    urls = list(dict.fromkeys(r.url for r in refs))
    if not urls:
        return
    v = cfg.vision

    def check(url: str) -> ImageRefusedError | None:
        try:
            check_url(url, allow_loopback=v.allow_loopback_image_hosts, timeout=v.fetch_timeout_seconds)
        except ImageRefusedError as exc:
            return exc
        return None

    results = dict(zip(urls, Pool(min(CONCURRENCY, len(urls))).map(check, urls), strict=True))
    for ref in refs:
        if results[ref.url] is not None:
            raise _named(ref, results[ref.url])


def budget(cfg: Config) -> ByteBudget:
    """This worker's byte budget for image fetches (made on first use, in the worker process)."""
    global _budget
    if _budget is None:
        _budget = ByteBudget(BUDGET_IMAGES * cfg.vision.max_image_bytes)
    return _budget


def _fetch(cfg: Config, refs: list[ImageRef], lease: Lease) -> None:
    """Fetch remote images concurrently (each distinct URL once); the first refusal, in request order, is raised.

    Each fetch first reserves max_image_bytes of the worker's budget, waiting up to fetch_timeout_seconds for
    other requests to free some (then a 503), so the bytes in flight never pass the budget.
    """
    urls = list(dict.fromkeys(r.url for r in refs))
    if not urls:
        return
    v = cfg.vision
    pot = budget(cfg)

    def get(url: str) -> tuple[bytes, str] | GatewayError:
        try:
            pot.reserve(lease, v.max_image_bytes, wait=v.fetch_timeout_seconds)
        except GatewayError as exc:
            return exc
        kept = 0
        try:
            data, mime = fetch_image(url, allow_loopback=v.allow_loopback_image_hosts, max_bytes=v.max_image_bytes,
                                     timeout=v.fetch_timeout_seconds)
            kept = len(data)
            return data, mime
        except ImageRefusedError as exc:
            return exc
        finally:
            pot.keep(lease, v.max_image_bytes, kept)

    results = dict(zip(urls, Pool(min(CONCURRENCY, len(urls))).map(get, urls), strict=True))
    for ref in refs:
        got = results[ref.url]
        if isinstance(got, ImageRefusedError):
            raise _named(ref, got)
        if isinstance(got, GatewayError):
            raise got
        ref.data, ref.mime = got


def _cached(cfg: Config, key_id: int, model_id: str, digests: list[str]) -> dict[str, str]:
    """This key's cached descriptions of these images by this bridge model: digest -> description."""
    digests = list(dict.fromkeys(digests))
    if not digests:
        return {}
    rows = db.read(cfg.server.database, "SELECT image_hash, description FROM vision_descriptions WHERE key_id = ? "
                   f"AND model = ? AND image_hash IN ({','.join('?' * len(digests))})", (key_id, model_id, *digests))
    return {row[0]: row[1] for row in rows}


def _bridge_model(cfg: Config, model: ModelConfig) -> ModelConfig:
    """The configured bridge model (its upstream key checked now, before any credit moves)."""
    name = cfg.vision.bridge_model
    if not name or name not in cfg.models:
        raise BadRequestError(f"The model '{model.id}' cannot read images and this gateway has no vision bridge to "
                             "describe them: the operator must set bridge_model (a model with vision = true) in "
                             "the [vision] table of config.toml. Or send the images to a vision model.",
                             param="model", code="model_not_supported")
    bridge = cfg.models[name]
    require_key(cfg.upstream_for(bridge))
    return bridge


def _bridge_body(upstream: UpstreamConfig, bridge: ModelConfig, url: str) -> dict:
    return {"model": bridge.upstream_model,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": INSTRUCTION},
                {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}]}],
            upstream.max_tokens_field: min(BRIDGE_MAX_TOKENS, bridge.max_output_tokens)}


def _bridge_estimate(bridge: ModelConfig, upstream: UpstreamConfig) -> int:
    """Nano-credits held per bridge call: an image's prompt estimate plus the instruction, and the full output cap."""
    prompt = tokens.chat_prompt(_bridge_body(upstream, bridge, "data:"))
    return billing.bridge_call_hold(bridge, prompt, min(BRIDGE_MAX_TOKENS, bridge.max_output_tokens))


def _bridge_call(bridge: ModelConfig, upstream: UpstreamConfig,
                 ref: ImageRef) -> tuple[str, billing.Usage, bool] | GatewayError:
    """(description, its usage, whether that was estimated) from one bridge call, or the error it met."""
    body = _bridge_body(upstream, bridge, ref.data_url())
    try:
        result = providers.for_upstream(upstream).chat(upstream, "chat", body)
    except GatewayError as exc:
        return exc
    try:
        text = result.doc["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        text = None
    if not isinstance(text, str) or not text.strip():
        return UpstreamError(f"The upstream '{upstream.name}' answered without a description.")
    usage = billing.read_usage(result.usage_report)
    if usage is not None:
        return text.strip(), usage, False
    return text.strip(), billing.Usage(tokens.chat_prompt({"messages": body["messages"]}), tokens.count(text)), True


def _store(cfg: Config, key_id: int, model_id: str, fresh: dict[str, str]) -> None:
    """Cache new descriptions for this key; keep at most cache_max_entries rows in all, dropping the oldest (rowid
    is insert order)."""
    def work(conn: sqlite3.Connection) -> None:
        now = time.time()
        conn.executemany("INSERT OR REPLACE INTO vision_descriptions(key_id, image_hash, model, description, "
                         "created_at) VALUES (?, ?, ?, ?, ?)", [(key_id, d, model_id, text, now)
                                                                for d, text in fresh.items()])
        conn.execute("DELETE FROM vision_descriptions WHERE rowid <= (SELECT MAX(rowid) FROM vision_descriptions)"
                     " - ?", (cfg.vision.cache_max_entries,))
    try:
        db.write(cfg.server.database, work)
    except sqlite3.Error as exc:  # a cache that cannot be written only costs a later request a bridge call
        log.warning("vision cache not written: %s", exc)

