from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from llamacpp_ha_server import ServerConfig, ServerContext, create_app
from llamacpp_ha_server._http import http_protocol

from llamacpp_ha import BackendConfig
from llamacpp_ha.sim import SimServer


class AppServer:
    """A llamacpp-ha-server app served by uvicorn on 127.0.0.1 in a thread (real sockets)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.context: ServerContext = app.state.llamacpp_ha
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        settings = app.state.llamacpp_ha.config.server
        protocol = http_protocol(header_timeout_s=settings.header_timeout_s, max_connections=settings.max_connections)
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=1, http=protocol, ws="none",
            timeout_keep_alive=settings.keep_alive_s,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve(sockets=[sock])), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture
def serve() -> Iterator[Callable[..., AppServer]]:
    """Serve a proxy over the given backends; stopped after the test."""
    started: list[AppServer] = []

    def start(*backends: SimServer[Any] | str, **settings: Any) -> AppServer:
        server_section = settings.pop("server", {})
        settings.setdefault("poll_interval_s", 0.2)
        config = ServerConfig(
            backends=[
                BackendConfig(url=sim if isinstance(sim, str) else sim.url, name=f"b{i}")
                for i, sim in enumerate(backends)
            ],
            server=server_section,
            **settings,
        )
        app_server = AppServer(create_app(config))
        started.append(app_server)
        return app_server

    yield start
    for app_server in started:
        app_server.stop()
