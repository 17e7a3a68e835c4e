from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from types import TracebackType
from typing import Any, Generic, Self, cast, overload

from typing_extensions import TypeVar

from ._app import SimulatedLlamaServer
from ._config import SimConfig
from ._http import http_protocol
from ._router import SimulatedLlamaRouter

__all__ = ["SimProcess", "SimServer", "free_port", "free_ports"]

_HOST = "127.0.0.1"

# The default keeps a bare ``SimServer`` annotation meaning a single-model server.
_App = TypeVar("_App", SimulatedLlamaServer, SimulatedLlamaRouter, default=SimulatedLlamaServer)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports on 127.0.0.1 that nothing listens on right now.

    Each is held while the next is chosen: the kernel hands a port just released out again, and two
    backends launched together on one port would make two URLs for one server."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind((_HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


class SimServer(Generic[_App]):
    """A simulated llama-server served by uvicorn on 127.0.0.1, in a thread of this process.

    ``with SimServer(slots=2) as sim: sim.url`` gives a real socket to talk to; ``sim.app`` is
    the :class:`SimulatedLlamaServer`, whose slots and fault switches a test can inspect.
    ``SimServer(SimulatedLlamaRouter({...}))`` serves a simulated router-mode server instead.
    """

    @overload
    def __init__(self: SimServer[SimulatedLlamaServer], app: None = None, *, port: int = 0, **config: Any) -> None: ...
    @overload
    def __init__(self, app: _App, *, port: int = 0) -> None: ...
    def __init__(self, app: Any = None, *, port: int = 0, **config: Any) -> None:
        self.app: _App = cast("_App", app if app is not None else SimulatedLlamaServer(SimConfig(**config)))
        self._port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{_HOST}:{self._port}"

    def start(self) -> Self:
        try:
            import uvicorn
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError('serving the simulator needs uvicorn: pip install "llamacpp-ha[sim]"') from exc
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((_HOST, self._port))
        sock.listen(512)
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_level="warning",
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=1,
            access_log=False,
            http=http_protocol(self.app.config.close_after_stream),
        )
        server = uvicorn.Server(config)
        self._server = server
        self.app.restart_loading()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])), name=f"sim-{self._port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"simulated llama-server on port {self._port} did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class SimProcess:
    """A simulated llama-server in its own process, which a test can kill like a crashed backend."""

    def __init__(self, *, port: int | None = None, **config: Any) -> None:
        self.port = port or free_port()
        self._config = SimConfig(**config)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{_HOST}:{self.port}"

    def start(self, timeout: float = 15.0) -> Self:
        return self.launch().wait_ready(timeout)

    def launch(self) -> Self:
        """Start the process without waiting for it (launch several, then ``wait_ready`` each)."""
        command = [sys.executable, "-m", "llamacpp_ha.sim", "--port", str(self.port)]
        command += ["--config-json", self._config.model_dump_json()]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def wait_ready(self, timeout: float = 15.0) -> Self:
        """Wait until the server answers ``/health`` (with anything, the loading 503 included)."""
        process = self._process
        assert process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                error = process.stderr.read().decode() if process.stderr else ""
                raise RuntimeError(f"simulated llama-server exited: {error}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1):
                    return self
            except urllib.error.HTTPError:
                return self  # it answers: loading
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"simulated llama-server on port {self.port} did not answer in {timeout} s")

    def kill(self) -> None:
        """End the process at once (SIGKILL): its connections drop mid-response."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=10)
        if self._process is not None and self._process.stderr is not None:
            self._process.stderr.close()
        self._process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
