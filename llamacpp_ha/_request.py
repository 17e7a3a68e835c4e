from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import BadRequestError

__all__ = ["SLOT_PATHS", "RequestFacts", "parse_request"]

# POST paths that occupy a llama-server slot; everything else is answered without one.
CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
PROMPT_PATHS = frozenset({"/v1/completions", "/completion", "/completions", "/infill"})
SLOT_PATHS = (
    CHAT_PATHS
    | PROMPT_PATHS
    | frozenset(
        {
            "/v1/embeddings",
            "/embeddings",
            "/v1/rerank",
            "/rerank",
            "/reranking",
            "/v1/responses",
            "/v1/messages",
        }
    )
)


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What routing needs to know about one inference request."""

    model: str | None
    stream: bool
    affinity_key: str | None


def parse_request(path: str, header: Callable[[str], str | None], body: bytes, prefix_chars: int) -> RequestFacts:
    """Read the routing facts of a slot-consuming request; raise BadRequestError for a bad body."""
    try:
        payload = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequestError("The request body must be a JSON object.")
    if path in CHAT_PATHS:
        messages = payload.get("messages")
        if messages is None:
            raise BadRequestError("'messages' is required.")
        if not isinstance(messages, list) or not messages:
            raise BadRequestError("'messages' must be a non-empty array of messages.")
    elif path in PROMPT_PATHS and "prompt" not in payload:
        raise BadRequestError("'prompt' is required.")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequestError("'model' must be a string.")
    return RequestFacts(
        model=model or None,
        stream=payload.get("stream") is True,
        affinity_key=_affinity_key(path, header, payload, model, prefix_chars),
    )


def _affinity_key(
    path: str,
    header: Callable[[str], str | None],
    payload: dict[str, Any],
    model: str | None,
    prefix_chars: int,
) -> str | None:
    session = header("x-session-id")
    if session:
        return "session:" + session
    user = payload.get("user")
    if isinstance(user, str) and user:
        return "user:" + user
    if path in CHAT_PATHS:
        leading = _leading_messages(payload["messages"])
    elif "prompt" in payload:
        prompt = payload["prompt"]
        leading = prompt if isinstance(prompt, str) else json.dumps(prompt)
    else:
        return None
    digest = hashlib.sha256()
    digest.update((model or "").encode())
    digest.update(b"\0")
    digest.update(leading[:prefix_chars].encode("utf-8", "surrogatepass"))
    return "prefix:" + digest.hexdigest()


def _leading_messages(messages: list[Any]) -> str:
    """The system prompt plus the first user message: what stays the same for a whole conversation."""
    system = next((m for m in messages if isinstance(m, dict) and m.get("role") in ("system", "developer")), None)
    user = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
    return "\0".join(_content_text(m) for m in (system, user))


def _content_text(message: dict[str, Any] | None) -> str:
    if message is None:
        return ""
    content = message.get("content")
    return content if isinstance(content, str) else json.dumps(content, sort_keys=True)
