"""Upstream providers, one module per config kind, each implementing the protocols of providers/base.py.

KINDS declares, without importing any provider (config reads it in gunicorn's master, before gevent patches
the workers, so ssl and urllib3 must not be imported there), which model modes each kind serves and which URL
schemes it speaks. for_upstream() imports a provider on first use.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from config import UpstreamConfig


@dataclass(frozen=True)
class Kind:
    module: str
    modes: tuple[str, ...]  # model modes (providers.base.CAPABILITIES) this kind implements
    schemes: tuple[str, ...]


KINDS: dict[str, Kind] = {
    "openai": Kind("providers.openai", ("chat", "image", "embedding", "speech", "transcription", "moderation"),
                   ("http", "https")),
    "gemini": Kind("providers.gemini", ("image",), ("http", "https")),
    "lyria": Kind("providers.lyria", ("music",), ("ws", "wss")),
}

_loaded: dict[str, Any] = {}


def for_kind(kind: str) -> Any:
    """The provider object of an upstream kind (its module's PROVIDER)."""
    provider = _loaded.get(kind)
    if provider is None:
        provider = _loaded[kind] = importlib.import_module(KINDS[kind].module).PROVIDER
    return provider


def for_upstream(upstream: UpstreamConfig) -> Any:
    return for_kind(upstream.kind)
