from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import BadRequestError
from ._prompt import NO_PROMPT, PromptShape, prompt_shape
from ._routes import Route

__all__ = ["RequestFacts", "check_json_body", "parse_request"]

# llama-server accepts ``n`` up to its slot count; far beyond any fleet's is a mistake.
_MAX_N = 128
_TOKEN_LIMITS = ("max_tokens", "max_completion_tokens", "n_predict", "max_output_tokens")
_NUMBERS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repeat_penalty")


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What routing needs to know about one inference request."""

    model: str | None
    stream: bool
    pin: str | None = None
    """An explicit conversation pin (``X-Session-Id`` header or ``user`` field), or None."""
    prompt: PromptShape = NO_PROMPT
    body: bytes | None = None
    """A rewritten body to send instead of the caller's, or None to send it as it came."""


def parse_request(
    route: Route, header: Callable[[str], str | None], body: bytes, block_bytes: int, max_blocks: int
) -> RequestFacts:
    """Read and check the routing facts of a slot-taking request; raise BadRequestError for a bad body."""
    payload = check_json_body(body)
    _check(route, payload)
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequestError("'model' must be a string.", param="model")
    if model is not None and not _encodable(model):
        raise BadRequestError("'model' is not valid Unicode.", param="model")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequestError("'stream' must be true or false.", param="stream")
    user = payload.get("user")
    session = header("x-session-id")
    pin = "session:" + session if session else ("user:" + user if isinstance(user, str) and user else None)
    return RequestFacts(
        model=model or None,
        stream=stream is True,
        pin=pin,
        prompt=prompt_shape(route.kind, payload, model, block_bytes, max_blocks),
        body=_without_slot_pin(payload),
    )


def _without_slot_pin(payload: dict[str, Any]) -> bytes | None:
    """The body without ``id_slot``, when it has one.

    A slot id pins a slot on whichever backend the balancer picks, not one the caller chose: a
    busy pinned slot makes llama-server defer the request beside idle ones, which is the waiting
    we exist to prevent. llama-server's own choice (the idle slot holding the longest prefix)
    keeps what pinning was for. Re-serializing costs a little, and only such requests pay it.
    """
    if "id_slot" not in payload:
        return None
    return json.dumps({k: v for k, v in payload.items() if k != "id_slot"}, ensure_ascii=False).encode()


def check_json_body(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or BadRequestError (for slotless routes too: llama-server says 500)."""
    try:
        payload = json.loads(body) if body else None
    except RecursionError:
        raise BadRequestError("The request body is nested too deeply.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequestError("The request body must be a JSON object.")
    return payload


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check(route: Route, payload: dict[str, Any]) -> None:
    """The checks that cost nothing next to parsing: shapes llama-server would choke on."""
    kind = route.kind
    if kind == "chat" or kind == "messages":
        messages = payload.get("messages")
        if messages is None:
            raise BadRequestError("'messages' is required.", param="messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequestError("'messages' must be a non-empty array of messages.", param="messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise BadRequestError(f"'messages[{index}]' must be an object.", param=f"messages[{index}]")
            if not isinstance(message.get("role"), str):
                raise BadRequestError(f"'messages[{index}].role' must be a string.", param=f"messages[{index}].role")
            content = message.get("content")
            if content is not None and not isinstance(content, (str, list)):
                param = f"messages[{index}].content"
                raise BadRequestError(f"'{param}' must be a string or an array of parts.", param=param)
    elif kind == "completion" and "prompt" not in payload:
        raise BadRequestError("'prompt' is required.", param="prompt")
    for name in _TOKEN_LIMITS:
        value = payload.get(name)
        if value is None:
            continue
        lowest = -1 if name == "n_predict" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise BadRequestError(f"'{name}' must be an integer >= {lowest}, got {value!r}.", param=name)
    n = payload.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _MAX_N):
        raise BadRequestError(f"'n' must be an integer from 1 to {_MAX_N}, got {n!r}.", param="n")
    for name in _NUMBERS:
        value = payload.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise BadRequestError(f"'{name}' must be a number, got {value!r}.", param=name)
