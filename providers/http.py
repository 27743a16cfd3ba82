"""Pooled HTTP to upstreams: one requests.Session per upstream per worker, and transport errors as GatewayErrors."""
from __future__ import annotations

import json
import os
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from config import UpstreamConfig
from errors import GatewayError, InvalidRequest, ModelNotFound, RateLimited, UpstreamError, UpstreamTimeout

_sessions: dict[str, requests.Session] = {}
_pid = 0


def session(upstream: UpstreamConfig) -> requests.Session:
    """The worker's pooled session for this upstream, made after fork so no socket is shared across processes."""
    global _pid
    if _pid != os.getpid():
        _sessions.clear()
        _pid = os.getpid()
    s = _sessions.get(upstream.name)
    if s is None:
        s = requests.Session()
        s.trust_env = False  # an operator's HTTP_PROXY must not silently reroute upstream calls
        # pool_block=False: extra connections are opened rather than waited for (RUNTIME.md 2.4).
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=upstream.pool_size, max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        _sessions[upstream.name] = s
    return s


def require_key(upstream: UpstreamConfig) -> str:
    """The upstream's API key, or a 502 that names the environment variable to set."""
    key = upstream.api_key()
    if not key:
        raise UpstreamError(f"The upstream '{upstream.name}' has no API key: set the environment variable "
                            f"{upstream.api_key_env} on the gateway and restart it.")
    return key


def post(upstream: UpstreamConfig, url: str, payload: Any, headers: dict[str, str], *,
         stream: bool = False, timeout: float | None = None) -> requests.Response:
    """POST JSON; transport failures become 502 (unreachable) or 504 (timed out)."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    try:
        return session(upstream).post(
            url, data=data, headers={"Content-Type": "application/json", **headers}, stream=stream,
            timeout=(upstream.connect_timeout_seconds, timeout or upstream.timeout_seconds))
    except requests.Timeout:
        raise UpstreamTimeout(f"The upstream '{upstream.name}' did not answer in time.") from None
    except requests.RequestException as exc:
        raise UpstreamError(f"The upstream '{upstream.name}' could not be reached ({type(exc).__name__}).") from None


def retry_after_seconds(value: str | None) -> str | None:
    """A Retry-After value worth relaying: whole seconds, at least 1."""
    if not value:
        return None
    try:
        return str(max(1, int(float(value) + 0.999)))
    except ValueError:
        return None


def status_error(upstream: UpstreamConfig, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, retry_after: str | None = None) -> GatewayError:
    """Map an upstream's HTTP error to the gateway's (DESIGN.md, Errors)."""
    if status in (400, 422):
        return InvalidRequest(message, status=status, code=code, param=param)
    if status == 404:
        return ModelNotFound(message, code=code or "model_not_found", param=param)
    if status == 429:
        headers = {"Retry-After": retry_after} if retry_after else {}
        return RateLimited(message, headers=headers, code=code or "rate_limit_exceeded")
    if status in (401, 403):
        return UpstreamError(f"The upstream '{upstream.name}' refused the gateway's credentials "
                             f"(HTTP {status}); the operator must check {upstream.api_key_env}.")
    if status == 504:
        return UpstreamTimeout(f"The upstream '{upstream.name}' timed out: {message}")
    return UpstreamError(f"The upstream '{upstream.name}' failed with HTTP {status}: {message}")
