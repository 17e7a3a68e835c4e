"""The one table of the paths the balancer knows: which take a slot and how their body is read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ROUTES", "SLOT_PATHS", "Route", "RouteKind", "route_for"]

RouteKind = Literal["chat", "completion", "infill", "messages", "responses", "embeddings", "rerank", "text"]


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    kind: RouteKind
    takes_slot: bool
    """Runs as a task in a llama-server slot (so it waits for a free one); else sent to any backend."""


def _routes(kind: RouteKind, takes_slot: bool, *paths: str) -> list[Route]:
    return [Route(path, kind, takes_slot) for path in paths]


ROUTES: dict[str, Route] = {
    route.path: route
    for route in (
        *_routes("chat", True, "/v1/chat/completions", "/chat/completions"),
        *_routes("completion", True, "/v1/completions", "/completions", "/completion"),
        *_routes("infill", True, "/infill"),
        *_routes("messages", True, "/v1/messages"),
        *_routes("responses", True, "/v1/responses"),
        *_routes("embeddings", True, "/v1/embeddings", "/embeddings", "/embedding"),
        *_routes("rerank", True, "/v1/rerank", "/rerank", "/reranking", "/v1/reranking"),
        *_routes(
            "text",
            False,
            "/tokenize",
            "/detokenize",
            "/apply-template",
            "/v1/chat/completions/input_tokens",
            "/v1/messages/count_tokens",
        ),
    )
}
"""POST paths, each once. ``GET /v1/models`` is answered from the registry; other GETs go to any backend."""

SLOT_PATHS = frozenset(path for path, route in ROUTES.items() if route.takes_slot)


def route_for(method: str, path: str) -> Route | None:
    return ROUTES.get(path) if method == "POST" else None
