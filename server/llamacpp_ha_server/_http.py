"""uvicorn's HTTP protocol, with its own parse errors answered in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from llamacpp_ha._errors import openai_error

__all__ = ["http_protocol"]


def http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's fastest HTTP protocol class, whose ``400`` for an unparsable request (a bad
    ``Content-Length``, a method like ``FOO``, a control character in a header) is JSON like every
    other error of ours instead of ``text/plain``. ``uvicorn.Config(http=...)`` takes the class."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class OpenAIErrorProtocol(Base):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(openai_error(msg, "invalid_request_error", "invalid_http_request")).encode()
            head = (
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
            )
            transport: Any = self.transport
            transport.write(head + body)
            transport.close()

    return OpenAIErrorProtocol
