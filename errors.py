"""OpenAI-shaped errors: every non-2xx answer the gateway gives is one of these, rendered by render() below.

Named as openai-python names the errors it raises for the same statuses. register(app) installs the handlers:
the gateway's own errors, Werkzeug's 404/405/413, and the catch-all 500 that logs the traceback.
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask, Response

log = logging.getLogger("gateway")


class ConfigError(Exception):
    """A config problem, phrased as one sentence naming the key and the fix; never sent to a client."""


class GatewayError(Exception):
    """An error with an HTTP status and OpenAI's {"error": {message, type, param, code}} body."""

    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body OpenAI's SDKs parse."""
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class BadRequestError(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class ContentPolicyError(GatewayError):
    status, type, code = 400, "invalid_request_error", "content_policy_violation"


class AuthenticationError(GatewayError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class InsufficientCreditsError(GatewayError):
    status, type, code = 402, "insufficient_quota", "insufficient_credits"


class PermissionDeniedError(GatewayError):
    """A valid key asking for something its policy does not allow (a model outside its allowed list)."""

    status, type, code = 403, "permission_error", "permission_denied"


class NotFoundError(GatewayError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ModelNotFoundError(GatewayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class PayloadTooLargeError(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class RateLimitError(GatewayError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class UpstreamError(GatewayError):
    """The upstream failed, answered nonsense, or refused the gateway's own credentials."""

    status, type, code = 502, "api_error", "upstream_error"


class UpstreamTimeoutError(GatewayError):
    status, type, code = 504, "api_error", "upstream_timeout"


_HTTP_CODES: dict[int, tuple[type[GatewayError], str]] = {
    404: (NotFoundError, "not_found"), 405: (BadRequestError, "method_not_allowed"),
    413: (PayloadTooLargeError, "request_too_large")}


def render(exc: GatewayError) -> Response:
    """The one renderer: the error's status, OpenAI's JSON body and its headers (Retry-After, ...)."""
    from flask import Response, g, has_request_context

    if has_request_context():
        g.error_code = exc.code or exc.type  # for the request's log line
    resp = Response(json.dumps(exc.body()), status=exc.status, mimetype="application/json")
    for name, value in exc.headers.items():
        resp.headers[name] = value
    return resp


def register(app: Flask) -> None:
    from flask import g, request
    from werkzeug.exceptions import HTTPException

    @app.errorhandler(GatewayError)
    def gateway_error(exc: GatewayError) -> Response:
        return render(exc)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        cls, code = _HTTP_CODES.get(exc.code or 500, (GatewayError, None))
        message = {404: f"Unknown request URL: {request.method} {request.path}.",
                   405: f"Method {request.method} is not allowed on {request.path}."}.get(exc.code, exc.description)
        return render(cls(message, status=exc.code, code=code))

    @app.errorhandler(Exception)
    def crashed(exc: Exception) -> Response:
        log.exception("request_id=%s unhandled error", g.get("request_id"))
        return render(GatewayError("The server had an error while processing your request."))
