"""ASGI plumbing of the simulator: types, request reading, and llama-server's response headers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._protocol import dumps

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_TYPE = b"application/json; charset=utf-8"
MIN_SLEEP_S = 0.001
"""Shorter simulated waits are skipped (or added up) rather than slept."""


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + dumps(event) + b"\n\n"


async def sleep_at_least_1ms(seconds: float) -> None:
    if seconds >= MIN_SLEEP_S:
        await asyncio.sleep(seconds)


async def watch_disconnect(receive: Receive, disconnected: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            return


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """The parsed body, or None where llama-server's parser throws (also on a lone surrogate)."""
    try:
        value = json.loads(raw)
        json.dumps(value, ensure_ascii=False).encode()
    except (ValueError, UnicodeEncodeError):
        return None
    return value


def _base_headers(origin: bytes, content_type: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"server", b"llama.cpp"),
        (b"access-control-allow-origin", origin),
        (b"content-type", content_type),
    ]


def stream_headers(origin: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"server", b"llama.cpp"),
        (b"access-control-allow-origin", origin),
        (b"x-accel-buffering", b"no"),
        (b"content-type", b"text/event-stream"),
        (b"keep-alive", b"timeout=5, max=100"),
    ]


async def send_response(
    send: Send,
    status: int,
    payload: bytes,
    content_type: bytes,
    origin: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        *(extra or []),
        *_base_headers(origin, content_type),
        (b"content-length", str(len(payload)).encode()),
    ]
    # Errors close the connection; successes advertise keep-alive (as the captures show).
    headers.append((b"connection", b"close") if status >= 400 else (b"keep-alive", b"timeout=5, max=100"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def send_json(send: Send, status: int, body: Any, origin: bytes) -> None:
    await send_response(send, status, dumps(body), JSON_TYPE, origin)


async def send_not_found(send: Send, origin: bytes) -> None:
    body = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
    await send_json(send, 404, body, origin)


async def send_preflight(send: Send, origin: bytes) -> None:
    headers = [
        (b"server", b"llama.cpp"),
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-credentials", b"true"),
        (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
        (b"access-control-allow-headers", b"*"),
        (b"content-type", b"text/html"),
        (b"keep-alive", b"timeout=5, max=100"),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
