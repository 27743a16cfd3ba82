"""OpenAI-shaped errors: every non-2xx answer the gateway gives is one of these, rendered in app.py."""
from __future__ import annotations


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
