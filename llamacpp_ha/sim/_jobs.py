"""A completion request as the simulator runs it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ._config import SimConfig
from ._protocol import error_body
from ._slots import Assignment
from ._text import render_chat, tokenize

__all__ = ["Job", "Kind", "Run", "parse_job"]

Kind = Literal["chat", "oai", "native"]


@dataclass
class Job:
    kind: Kind
    body: dict[str, Any]
    prompt: list[str]
    stream: bool
    max_tokens: int | None
    seed: int | None
    id_slot: int | None
    choices: int
    include_usage: bool
    return_progress: bool
    cache_prompt: bool


@dataclass
class Run:
    """What one task did, for the final event's timings and usage."""

    assignment: Assignment
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0
    pieces: list[str] = field(default_factory=list)
    truncated: bool = False
    finish_reason: str = "length"


def parse_job(config: SimConfig, kind: Kind, raw: bytes) -> Job | tuple[int, dict[str, Any]]:
    """A completion request as a job, or the status and body of llama-server's error for it."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        # llama-server maps a JSON parse failure to 500, not 400 (a quirk the balancer hides).
        return 500, error_body(500, f"[json.exception.parse_error.101] parse error: {exc}", "server_error")
    if not isinstance(body, dict):
        return 400, error_body(400, "the request body must be a JSON object", "invalid_request_error")
    if kind == "chat":
        messages = body.get("messages")
        if messages is None:
            return 400, error_body(400, "'messages' is required", "invalid_request_error")
        if not isinstance(messages, list):
            return 400, error_body(400, "Expected 'messages' to be an array", "invalid_request_error")
        prompt = tokenize(render_chat(messages))
        choices = body.get("n", 1)
    else:
        if "prompt" not in body:
            message = "[json.exception.out_of_range.403] key 'prompt' not found"
            return 400, error_body(400, message, "invalid_request_error")
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        prompt = ["<s>", *tokenize(str(prompts[0] if prompts else ""))]
        choices = max(1, len(prompts)) if kind == "oai" else 1
    if not isinstance(choices, int) or not 1 <= choices <= config.slots:
        message = f"Field 'n': Value must be between 1 <= value <= {config.slots}, but got {choices}"
        return 400, error_body(400, message, "invalid_request_error")
    limit = body.get("max_tokens", body.get("n_predict", body.get("max_completion_tokens")))
    id_slot = body.get("id_slot")
    stream_options = body.get("stream_options") or {}
    return Job(
        kind=kind,
        body=body,
        prompt=prompt,
        stream=bool(body.get("stream", False)),
        max_tokens=limit if isinstance(limit, int) and limit >= 0 else None,
        seed=body.get("seed") if isinstance(body.get("seed"), int) else None,
        id_slot=id_slot if isinstance(id_slot, int) and id_slot >= 0 else None,
        choices=choices,
        include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
        return_progress=bool(body.get("return_progress", False)),
        cache_prompt=body.get("cache_prompt") is not False,
    )
