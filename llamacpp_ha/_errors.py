"""Errors the balancer answers itself, in OpenAI's error shape.

Every error below becomes an HTTP response ``{"error": {"message", "type", "code"}}`` and
never touches a backend twice. Which status, which header, and who retries:

=====================  ======  ==========================================================
error                  status  meaning and retry policy
=====================  ======  ==========================================================
BadRequestError        400     body is not JSON, lacks ``messages``/``prompt``, or a field
                               has the wrong shape (``param`` names it); no backend was
                               contacted. Not retried.
ModelNotFoundError     404     no backend lists the model; the message lists those that do.
ContextLengthError     400     the prompt is clearly longer than the context of every backend
                               that serves the model (``context_length_exceeded``).
QueueFullError         429     ``max_queue`` requests already wait. ``retry-after-ms`` says
                               when to come back.
QueueTimeoutError      503     waited ``queue_timeout_s`` without a free slot.
                               ``retry-after-ms`` is set.
NoBackendError         503     every attempt failed before any response byte (connect
                               error, refused, backend loading); failover is exhausted.
UpstreamTimeoutError   504     the backend accepted the request and sent nothing for
                               ``read_timeout_s``. Not retried (it may still be working).
BalancerClosedError    503     the client or server is shutting down.
=====================  ======  ==========================================================

All of them carry ``x-should-retry: false``: the balancer has already queued and failed
over, so the OpenAI SDK must not pile its own retries on top (it obeys that header before
its status-based rules). Clients that want to come back later read ``retry-after-ms``.

Failures the balancer retries itself, before any byte reached the caller: a stale pooled
connection that the backend closed ("Server disconnected without sending a response",
which llama-server provokes by closing the connection after every stream) is retried
once on the same backend; a connect error, a refused connection or a 503 ``Loading
model`` moves the request to another backend, up to ``max_attempts`` backends. Once a
response has started nothing is retried: an upstream failure in the middle of an SSE
stream ends the stream with an ``data: {"error": ...}`` event, as llama-server itself does.
Upstream 4xx and 5xx responses pass through unchanged.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "BadRequestError",
    "BalancerClosedError",
    "BalancerError",
    "ContextLengthError",
    "ModelNotFoundError",
    "NoBackendError",
    "QueueFullError",
    "QueueTimeoutError",
    "UpstreamTimeoutError",
    "openai_error",
]


def openai_error(message: str, error_type: str, code: str, param: str | None = None) -> dict[str, Any]:
    """An error body in OpenAI's shape (``param`` names the offending field, when one does)."""
    error: dict[str, Any] = {"message": message, "type": error_type, "code": code}
    if param is not None:
        error["param"] = param
    return {"error": error}


class BalancerError(Exception):
    """An error the balancer answers itself instead of a backend's response."""

    status_code: int = 503
    error_type: str = "server_error"
    code: str = "balancer_error"

    def __init__(self, message: str, *, retry_after_s: float | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.param = param

    def body(self) -> dict[str, Any]:
        return openai_error(self.message, self.error_type, self.code, self.param)

    def body_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()

    def headers(self) -> list[tuple[str, str]]:
        headers = [("content-type", "application/json"), ("x-should-retry", "false")]
        if self.retry_after_s is not None:
            headers.append(("retry-after-ms", str(round(self.retry_after_s * 1000))))
            headers.append(("retry-after", str(max(1, round(self.retry_after_s)))))
        return headers


class BadRequestError(BalancerError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ModelNotFoundError(BalancerError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class QueueFullError(BalancerError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"


class QueueTimeoutError(BalancerError):
    status_code = 503
    error_type = "unavailable_error"
    code = "queue_timeout"


class NoBackendError(BalancerError):
    status_code = 503
    error_type = "unavailable_error"
    code = "no_backend_available"


class BalancerClosedError(BalancerError):
    status_code = 503
    error_type = "unavailable_error"
    code = "balancer_closed"


class UpstreamTimeoutError(BalancerError):
    status_code = 504
    error_type = "timeout_error"
    code = "upstream_timeout"


class ContextLengthError(BalancerError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "context_length_exceeded"
