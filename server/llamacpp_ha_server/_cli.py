"""``llamacpp-ha-server``: serve the balancer as an OpenAI-compatible proxy."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError

from llamacpp_ha import BackendConfig

from ._app import ServerContext, create_app
from ._config import ServerConfig, ServerSettings
from ._http import http_protocol
from ._logging import configure_logging
from ._proxy import ServerState

__all__ = ["DrainingServer", "main"]

logger = logging.getLogger("llamacpp_ha.server")


class DrainingServer(uvicorn.Server):
    """On SIGTERM or SIGINT: report draining, refuse new requests, let in-flight ones finish
    (up to the drain timeout), then stop. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._state = state
        self._drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._state.draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._state.draining = True
        # Signal handlers run between bytecodes: hand the drain to the event loop.
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        logger.warning(
            "draining: %d requests in flight, waiting up to %.0f s",
            self._state.in_flight,
            self._drain_timeout_s,
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._drain_timeout_s):
                await self._state.wait_idle()
        if self._state.in_flight:
            logger.warning("drain timeout: closing %d requests still in flight", self._state.in_flight)
        self.should_exit = True


def _fail(message: str) -> int:
    print(f"llamacpp-ha-server: {message}", file=sys.stderr)
    return 2


def load(path: str, host: str | None, port: int | None) -> ServerConfig:
    config = ServerConfig.from_file(path)
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if overrides:
        server = ServerSettings.model_validate(config.server.model_dump() | overrides)
        config = config.model_copy(update={"server": server})
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamacpp-ha-server", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="JSON, TOML or YAML file: the balancer's settings plus a 'server' section")
    source.add_argument("--demo", action="store_true", help="start simulated llama-servers in-process and a demo load")
    parser.add_argument("--host", help="overrides server.host")
    parser.add_argument("--port", type=int, help="overrides server.port")
    parser.add_argument("--demo-backends", type=int, default=3, help="simulated llama-servers in --demo (default 3)")
    parser.add_argument("--demo-slots", type=int, default=2, help="slots of each simulated llama-server (default 2)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="info: one line per request and per backend state change; debug adds every poll",
    )
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object per line")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)

    with contextlib.ExitStack() as stack:
        if args.demo:
            config = _demo_config(stack, args)
        else:
            if not Path(args.config).is_file():
                return _fail(f"{args.config}: no such file")
            try:
                config = load(args.config, args.host, args.port)
            except ValidationError as exc:
                return _fail(f"{args.config}: invalid configuration\n{exc}")
            except ValueError as exc:
                return _fail(f"{args.config}: {exc}")
        app = create_app(config)
        context: ServerContext = app.state.llamacpp_ha
        uv_config = uvicorn.Config(
            app, host=config.server.host, port=config.server.port, log_level=args.log_level, access_log=False,
            timeout_graceful_shutdown=1, ws="none", timeout_keep_alive=config.server.keep_alive_s,
            http=http_protocol(header_timeout_s=config.server.header_timeout_s,
                               max_connections=config.server.max_connections),
        )  # fmt: skip
        server = DrainingServer(uv_config, context.state, config.server.drain_timeout_s)
        if args.demo:
            base = f"http://{config.server.host}:{config.server.port}"
            print(f"\n  API:      {base}/v1  (OpenAI-compatible; no key needed in the demo)")
            print(f"  monitor:  {base}/monitor")
            print(f"  metrics:  {base}/metrics")
            body = '{"model": "tiny-random-llama", "messages": [{"role": "user", "content": "Hello"}]}'
            curl = f"curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"
            print(f"  try:      {curl}\n", flush=True)
            stack.enter_context(_DemoLoad(base))
        server.run()
    return 0


def _demo_config(stack: contextlib.ExitStack, args: argparse.Namespace) -> ServerConfig:
    from llamacpp_ha.sim import SimServer, free_port

    backends = []
    for _ in range(args.demo_backends):
        sim = stack.enter_context(SimServer(slots=args.demo_slots, decode_tokens_per_s=60, prefill_tokens_per_s=2_000))
        backends.append(BackendConfig(url=sim.url))
    print(f"started {len(backends)} simulated llama-servers x {args.demo_slots} slots: "
          + ", ".join(b.url for b in backends))  # fmt: skip
    server = ServerSettings(host=args.host or "127.0.0.1", port=args.port or free_port())
    return ServerConfig(backends=backends, server=server, poll_interval_s=0.5)


class _DemoLoad:
    """A few chat conversations at a time against the demo server, so the monitor has something to show.

    Bounded: it stops with the server, and after an hour at the latest.
    """

    def __init__(self, base_url: str) -> None:
        self._base_url = base_url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="demo-load", daemon=True)

    def __enter__(self) -> _DemoLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    async def _run(self) -> None:
        import httpx2

        deadline = time.monotonic() + 3600
        async with httpx2.AsyncClient(base_url=self._base_url, timeout=60) as client:
            for _ in range(100):
                if await _healthy(client) or self._stop.is_set():
                    break
                await asyncio.sleep(0.2)

            # Prompts long enough for the prefix index (several 512-byte blocks), so the monitor
            # shows routing at work: a shared system prompt, then each conversation's own text.
            system = "You are a helpful demo assistant. " + " ".join(f"Rule {i}: be brief." for i in range(40))

            async def conversation(index: int) -> None:
                story = " ".join(f"chapter {index}.{i} of the story" for i in range(25))
                messages = [{"role": "system", "content": system},
                            {"role": "user", "content": f"Summarize this, number {index}: {story}"}]  # fmt: skip
                for _ in range(3):
                    if self._stop.is_set():
                        return
                    body = {
                        "model": "tiny-random-llama",
                        "messages": messages,
                        "max_tokens": 40,
                        "stream": True,
                    }
                    with contextlib.suppress(Exception):
                        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                            async for _ in response.aiter_raw():
                                pass
                    messages = [
                        *messages,
                        {"role": "assistant", "content": "..."},
                        {"role": "user", "content": "go on"},
                    ]
                    await asyncio.sleep(0.5)

            index = 0
            running: set[asyncio.Task[None]] = set()
            while not self._stop.is_set() and time.monotonic() < deadline:
                while len(running) < 10:
                    index += 1
                    running.add(asyncio.create_task(conversation(index)))
                _, running = await asyncio.wait(running, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            for task in running:
                task.cancel()


async def _healthy(client: Any) -> bool:
    with contextlib.suppress(Exception):
        return bool((await client.get("/health")).status_code == 200)
    return False


if __name__ == "__main__":
    sys.exit(main())
