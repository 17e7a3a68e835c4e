"""Connections that never finish a request, too many connections, odd upgrades: each gets an
answer in OpenAI's shape, in bounded time, and nothing stays open."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from llamacpp_ha.sim import SimServer

from .conftest import AppServer

Sims = Callable[..., SimServer]
Serve = Callable[..., AppServer]


def connect(server: AppServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, Any], bool]:
    """Status, JSON body, and whether the server then closed the connection."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536)
    sock.settimeout(1.0)
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False  # kept alive
    return int(head.split()[1]), json.loads(body), closed


def test_headers_that_never_finish_get_408_and_the_connection_closes(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=1), server={"header_timeout_s": 0.5})
    with connect(server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and nothing more
        started = time.monotonic()
        status, body, closed = read_response(sock)
    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert closed
    assert 0.4 < time.monotonic() - started < 3


def test_many_slow_header_connections_are_all_closed(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=1), server={"header_timeout_s": 0.5})
    socks = [connect(server) for _ in range(50)]
    try:
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for sock in socks:
            status, _, closed = read_response(sock)
            assert (status, closed) == (408, True)
    finally:
        for sock in socks:
            sock.close()
    with connect(server) as sock:  # and the server still serves
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(100).startswith(b"HTTP/1.1 200")


def test_a_body_that_stops_arriving_gets_408(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=1), server={"body_timeout_s": 0.5})
    with connect(server) as sock:
        sock.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"mess')
        status, body, _ = read_response(sock)
    assert status == 408
    assert body["error"]["code"] == "request_timeout"


def test_connections_beyond_the_limit_get_503_in_json(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=1), server={"max_connections": 3})
    idle = [connect(server) for _ in range(4)]
    try:
        time.sleep(0.2)
        with connect(server) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, body, closed = read_response(sock)
        assert (status, closed) == (503, True)
        assert body["error"]["code"] == "too_many_connections"
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.parametrize("request_line", [b"FOO / HTTP/1.1", b"POST /v1/chat/completions HTTP/1.1"])
def test_odd_methods_and_upgrades_get_an_answer(sims: Sims, serve: Serve, request_line: bytes) -> None:
    server = serve(sims(slots=1))
    with connect(server) as sock:
        sock.sendall(
            request_line + b"\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 0\r\n\r\n"
        )
        status, body, _ = read_response(sock)
    assert status in (400, 404, 405)
    error = body["error"]
    assert isinstance(error, dict)
    assert {"message", "type", "code"} <= set(error)


def test_an_idle_keep_alive_connection_outlives_client_pools(sims: Sims, serve: Serve) -> None:
    # httpx keeps an idle connection 5 s: the server must keep it longer, or a client reusing it
    # just as the server closes it gets a reset (uvicorn's own default is exactly 5 s).
    server = serve(sims(slots=1), server={"keep_alive_s": 8})
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(request)
        status, _, closed = read_response(sock)  # waits 1 s for a close
        assert (status, closed) == (200, False)
        time.sleep(5.0)  # 6 s idle in all
        sock.sendall(request)
        status, body, _ = read_response(sock)
    assert status == 200
    assert body["object"] == "list"


def test_after_an_internal_error_the_connection_serves_the_next_request(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=1))

    def broken() -> dict[str, Any]:
        raise RuntimeError("a bug")

    server.context.balancer.models_payload = broken  # type: ignore[method-assign]
    with connect(server) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body, closed = read_response(sock)
        assert (status, body["error"]["code"], closed) == (500, "internal_error", False)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body, _ = read_response(sock)
    assert status == 200
    assert body["status"] == "ok"


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        # HTTP/1.0: no keep-alive, so the server closes right after its answer.
        (b"POST /nope HTTP/1.0\r\nHost: x\r\nContent-Length: %d\r\n\r\n", 404),
        (b"POST /health HTTP/1.0\r\nHost: x\r\nContent-Length: %d\r\n\r\n", 405),
        (b"POST /v1/completions HTTP/1.0\r\nHost: x\r\nContent-Length: %d\r\n\r\n", 413),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ],
)
def test_an_answer_before_a_large_body_is_read_still_reaches_the_client(
    sims: Sims, serve: Serve, request_head: bytes, status: int
) -> None:
    """Answering and closing while the client still sends makes the kernel reset the connection,
    and the client loses the answer: the rest of the body is drained, or the close lingers."""
    server = serve(sims(slots=1))  # the default limit, 16 MiB
    body = b'{"prompt": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    head = request_head % len(body) if b"%d" in request_head else request_head
    sock = connect(server)
    sock.sendall(head + body)  # the whole body: as a client library does before it reads
    answer, error, _ = read_response(sock)
    assert answer == status
    assert {"message", "type", "code"} <= set(error["error"])
    sock.close()
