"""An in-memory fleet of llama-servers behind ``httpx2.MockTransport``, for narrow unit tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2

from llamacpp_ha import BackendConfig, BalancerConfig
from llamacpp_ha.sim import SimConfig
from llamacpp_ha.sim._protocol import models_body, props_body

Inference = Callable[[httpx2.Request], httpx2.Response]

CHAT_OK = {
    "choices": [{"finish_reason": "stop", "index": 0, "message": {"role": "assistant", "content": "hello"}}],
    "created": 1795724699,
    "model": "tiny-random-llama.gguf",
    "object": "chat.completion",
    "usage": {"completion_tokens": 1, "prompt_tokens": 5, "total_tokens": 6},
    "id": "chatcmpl-x",
}


def chat_ok(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, json=CHAT_OK)


class ChunkStream(httpx2.AsyncByteStream):
    """A response body that yields chunks, then optionally fails like a dropped connection."""

    def __init__(self, chunks: list[bytes], fail: Exception | None = None) -> None:
        self.chunks = chunks
        self.fail = fail
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.fail is not None:
            raise self.fail

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class MockBackend:
    name: str
    slots: int = 2
    busy: int = 0
    health: int = 200
    reachable: bool = True
    model: str = "tiny-random-llama.gguf"
    sleeping: bool = False
    inference: Inference = chat_ok

    @property
    def url(self) -> str:
        return f"http://{self.name}:8080"


@dataclass
class MockFleet:
    backends: dict[str, MockBackend] = field(default_factory=dict)
    requests: list[httpx2.Request] = field(default_factory=list)
    """Every request that is not a /health, /props, /v1/models or /slots poll, in order."""
    polls: list[str] = field(default_factory=list)
    """``host path`` of every poll, in order."""

    @classmethod
    def of(cls, *names: str, **settings: Any) -> MockFleet:
        return cls({name: MockBackend(name, **settings) for name in names})

    def config(self, **settings: Any) -> BalancerConfig:
        backends = [BackendConfig(url=b.url, name=b.name) for b in self.backends.values()]
        return BalancerConfig(backends=backends, **settings)

    def transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self.handle)

    def inference_to(self, name: str) -> list[httpx2.Request]:
        return [r for r in self.requests if r.url.host == name]

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        backend = self.backends[request.url.host]
        if not backend.reachable:
            raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)
        if backend.health == 503:
            body = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
            return httpx2.Response(503, json=body)
        config = SimConfig(model=backend.model, slots=backend.slots)
        path = request.url.path
        if request.method == "GET" and path in ("/health", "/props", "/v1/models", "/slots"):
            self.polls.append(f"{backend.name} {path}")
        if request.method == "GET" and path == "/health":
            return httpx2.Response(200, json={"status": "ok"})
        if request.method == "GET" and path == "/props":
            return httpx2.Response(200, json=props_body(config) | {"is_sleeping": backend.sleeping})
        if request.method == "GET" and path == "/v1/models":
            return httpx2.Response(200, json=models_body(config, 0))
        if request.method == "GET" and path == "/slots":
            slots = [{"id": i, "n_ctx": 1024, "speculative": False, "is_processing": i < backend.busy}
                     for i in range(backend.slots)]  # fmt: skip
            return httpx2.Response(200, json=slots)
        self.requests.append(request)
        return backend.inference(request)


def sse(*events: dict[str, Any]) -> list[bytes]:
    return [b"data: " + json.dumps(event).encode() + b"\n\n" for event in events]
