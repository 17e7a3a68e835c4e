"""A simulated llama-server in router mode (``--models-dir``): several models, loaded on demand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qs

from ._app import SimulatedLlamaServer
from ._asgi import Message, Receive, Scope, Send, header, lifespan, parse_json, read_body, send_json, send_preflight
from ._config import SimConfig
from ._protocol import error_body, models_body, unix_now

__all__ = ["ModelStatus", "SimulatedLlamaRouter"]

_MODEL_GETS = frozenset({"/slots", "/metrics", "/props"})
"""GETs the router forwards to a model's server; they need ``?model=`` (``/props`` without it is the router's)."""


class ModelStatus(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"


@dataclass
class _Model:
    config: SimConfig
    status: ModelStatus = ModelStatus.UNLOADED
    server: SimulatedLlamaServer | None = None
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    last_used: float = 0.0
    loads: int = 0
    fail_next_load: bool = False
    exit_code: int = 0


class SimulatedLlamaRouter:
    """An ASGI app that speaks llama-server b11312's router mode (``server-models.cpp``).

    Each model runs in its own simulated server, started on the first request that names it
    (``load_s`` later) unless ``autoload`` is off; at most ``models_max`` run at once, the least
    recently used (by POST requests, as the router counts) is unloaded to make room. Requests
    must name a model; GETs of ``/slots``, ``/metrics`` and ``/props`` take it as ``?model=``,
    and ``autoload=false`` in the query answers 400 ``model is not loaded`` instead of loading.
    """

    def __init__(
        self,
        models: Mapping[str, SimConfig],
        *,
        models_max: int = 4,
        autoload: bool = True,
        load_s: float = 0.2,
    ) -> None:
        self.models = {
            name: _Model(config.model_copy(update={"model": f"router/{name}.gguf", "aliases": (name,)}))
            for name, config in models.items()
        }
        first = next(iter(models.values()), SimConfig())
        self.config = first
        """What the HTTP layer reads (closing streamed connections) is the same for every model."""
        self.models_max = models_max
        self.autoload = autoload
        self.load_s = load_s
        self._created = unix_now()

    def restart_loading(self) -> None:
        """Nothing to do: the router itself answers at once; its models load on demand."""

    def server(self, name: str) -> SimulatedLlamaServer | None:
        """The running server of a model (None while unloaded), for tests to inspect."""
        return self.models[name].server

    def unload(self, name: str) -> None:
        model = self.models[name]
        model.status = ModelStatus.UNLOADED
        model.server = None
        model.loaded = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        origin = header(scope, b"origin") or b""
        method: str = scope["method"]
        path: str = scope["path"]
        query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        if method == "OPTIONS":
            await send_preflight(send, origin)
        elif method == "GET" and path in ("/health", "/v1/health"):
            await send_json(send, 200, {"status": "ok"}, origin)
        elif method == "GET" and path in ("/v1/models", "/models"):
            await send_json(send, 200, self._models_body(), origin)
        elif method == "GET" and path == "/props" and "model" not in query:
            await send_json(send, 200, self._router_props(), origin)
        elif method == "GET" and path in _MODEL_GETS:
            await self._forward(scope, receive, send, query.get("model", ""), query, None, origin)
        elif method == "POST" and path in ("/models/load", "/models/unload"):
            await self._manage(path, await read_body(receive), send, origin)
        elif method == "POST":
            raw = await read_body(receive)
            body = parse_json(raw)
            if not isinstance(body, dict):
                # The router parses with nlohmann::json and its exception handler answers 500.
                await send_json(send, 500, error_body(500, "[json.exception.parse_error.101]", "server_error"), origin)
                return
            model = body.get("model")
            await self._forward(scope, receive, send, model if isinstance(model, str) else "", query, raw, origin)
        else:
            body = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
            await send_json(send, 404, body, origin)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        name: str,
        query: dict[str, str],
        raw: bytes | None,
        origin: bytes,
    ) -> None:
        autoload = self.autoload if "autoload" not in query else query["autoload"] in ("true", "1")
        if not name:
            await send_json(send, 400, error_body(400, "model name is missing from the request", _INVALID), origin)
            return
        model = self.models.get(name)
        if model is None:
            await send_json(send, 400, error_body(400, f"model '{name}' not found", _INVALID), origin)
            return
        if not autoload and model.status is ModelStatus.UNLOADED:
            await send_json(send, 400, error_body(400, "model is not loaded", _INVALID), origin)
            return
        if autoload:
            await self._ensure_loaded(name)
        if raw is not None:
            model.last_used = time.monotonic()
        server = model.server
        if server is None and model.exit_code:
            message = f"model '{name}' failed to load (exit code {model.exit_code})"
            await send_json(send, 500, error_body(500, message, "server_error"), origin)
            return
        if server is None:
            # Loading, asked not to wait: the child answers like any llama-server still loading.
            await send_json(send, 503, error_body(503, "Loading model", "unavailable_error"), origin)
            return
        await server(scope, _replay(raw, receive) if raw is not None else receive, send)

    async def _ensure_loaded(self, name: str) -> None:
        model = self.models[name]
        if model.status is ModelStatus.UNLOADED:
            self._start_loading(name)
        await model.loaded.wait()

    def _start_loading(self, name: str) -> None:
        running = [n for n, m in self.models.items() if m.status is not ModelStatus.UNLOADED]
        if len(running) >= self.models_max:
            self.unload(min(running, key=lambda n: self.models[n].last_used))
        model = self.models[name]
        model.status = ModelStatus.LOADING
        model.loads += 1
        asyncio.get_running_loop().call_later(self.load_s, self._finish_loading, name, model.loaded)

    def _finish_loading(self, name: str, loaded: asyncio.Event) -> None:
        model = self.models[name]
        if model.loaded is not loaded:
            return  # unloaded while it loaded
        if model.fail_next_load:
            model.fail_next_load = False
            model.exit_code = 1
            model.status = ModelStatus.UNLOADED
            model.loaded = asyncio.Event()
            loaded.set()  # its waiters find no server and answer 500
            return
        model.exit_code = 0
        model.server = SimulatedLlamaServer(model.config)
        model.status = ModelStatus.LOADED
        loaded.set()

    async def _manage(self, path: str, raw: bytes, send: Send, origin: bytes) -> None:
        body = parse_json(raw)
        name = body.get("model", "") if isinstance(body, dict) else ""
        model = self.models.get(name) if isinstance(name, str) else None
        if model is None:
            await send_json(send, 404 if path == "/models/load" else 400, _not_found(path), origin)
            return
        running = model.status is not ModelStatus.UNLOADED
        if path == "/models/load":
            if running:
                await send_json(send, 400, error_body(400, "model is already running", _INVALID), origin)
                return
            self._start_loading(name)
        else:
            if not running:
                await send_json(send, 400, error_body(400, "model is not running", _INVALID), origin)
                return
            self.unload(name)
        await send_json(send, 200, {"success": True}, origin)

    def _router_props(self) -> dict[str, Any]:
        return {
            "role": "router",
            "max_instances": self.models_max,
            "models_autoload": self.autoload,
            "model_alias": "llama-server",
            "model_path": "none",
            "default_generation_settings": {"params": None, "n_ctx": 0},
            "ui_settings": {},
            "build_info": self.config.build_info,
            "cors_proxy_enabled": False,
        }

    def _models_body(self) -> dict[str, Any]:
        data = []
        for name, model in self.models.items():
            status: dict[str, Any] = {"value": model.status.value, "args": ["llama-server", "--alias", name]}
            if model.exit_code:
                status |= {"exit_code": model.exit_code, "failed": True}
            entry: dict[str, Any] = {
                "id": name,
                "aliases": [],
                "tags": [],
                "object": "model",
                "owned_by": "llamacpp",
                "created": self._created,
                "status": status,
                "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                "source": "models_dir",
                "can_remove": False,
            }
            if model.server is not None:
                entry["meta"] = models_body(model.config, self._created)["data"][0]["meta"]
            data.append(entry)
        return {"data": data, "object": "list"}


_INVALID = "invalid_request_error"


def _not_found(path: str) -> dict[str, Any]:
    if path == "/models/load":
        return error_body(404, "model is not found", "not_found_error")
    return error_body(400, "model is not found", _INVALID)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the already-read body once, then the client's own messages."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
