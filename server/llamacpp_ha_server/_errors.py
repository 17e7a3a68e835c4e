from __future__ import annotations

import json

from starlette.types import Send

from llamacpp_ha._errors import openai_error

__all__ = ["error_body", "send_error"]


def error_body(message: str, error_type: str, code: str) -> bytes:
    """An error in OpenAI's shape, as bytes."""
    return json.dumps(openai_error(message, error_type, code)).encode()


async def send_error(send: Send, status: int, message: str, error_type: str, code: str, *, retry: bool = False) -> None:
    """Answer with an OpenAI-shaped error straight from ASGI (middleware and the proxy path)."""
    body = error_body(message, error_type, code)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-should-retry", b"true" if retry else b"false"),
    ]
    if retry:
        headers.append((b"retry-after-ms", b"1000"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
