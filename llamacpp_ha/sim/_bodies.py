"""Response bodies and SSE events of a job, in the framing of each endpoint."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._asgi import sse
from ._config import SimConfig
from ._jobs import Job, Run
from ._protocol import generation_settings, new_completion_id, timings, unix_now

__all__ = ["StreamEvents", "final_body", "job_timings", "job_usage", "native_final"]


def final_body(config: SimConfig, job: Job, run: Run) -> dict[str, Any]:
    """The whole response of a non-streamed job."""
    text = "".join(run.pieces)
    common = {
        "created": unix_now(),
        "model": config.model_id,
        "system_fingerprint": config.build_info,
    }
    usage = job_usage(job, run)
    if job.kind == "chat":
        choices = [
            {
                "finish_reason": run.finish_reason,
                "index": i,
                "message": {"role": "assistant", "content": text},
            }
            for i in range(job.choices)
        ]
        return {
            "choices": choices,
            **common,
            "object": "chat.completion",
            "usage": usage,
            "id": new_completion_id(),
            "timings": job_timings(job, run),
        }
    if job.kind == "oai":
        choices = [
            {"text": text, "index": i, "logprobs": None, "finish_reason": run.finish_reason} for i in range(job.choices)
        ]
        return {
            "choices": choices,
            **common,
            "object": "text_completion",
            "usage": usage,
            "id": new_completion_id(),
            "timings": job_timings(job, run),
        }
    return native_final(config, job, run, text)


def native_final(config: SimConfig, job: Job, run: Run, content: str) -> dict[str, Any]:
    settings = generation_settings(run.assignment.slot.params)
    return {
        "index": 0,
        "content": content,
        "tokens": [],
        "id_slot": run.assignment.slot.id,
        "stop": True,
        "model": config.model_id,
        "tokens_predicted": len(run.pieces),
        "tokens_evaluated": len(job.prompt),
        "generation_settings": settings,
        "prompt": " ".join(job.prompt),
        "has_new_line": False,
        "truncated": run.truncated,
        "stop_type": "limit" if run.finish_reason == "length" else "eos",
        "stopping_word": "",
        "tokens_cached": len(job.prompt) + len(run.pieces),
        "timings": job_timings(job, run),
    }


def job_usage(job: Job, run: Run) -> dict[str, Any]:
    completion = len(run.pieces) * job.choices
    return {
        "completion_tokens": completion,
        "prompt_tokens": len(job.prompt),
        "total_tokens": completion + len(job.prompt),
        "prompt_tokens_details": {"cached_tokens": run.assignment.cache_n},
    }


def job_timings(job: Job, run: Run) -> dict[str, Any]:
    cache_n = run.assignment.cache_n
    return timings(cache_n, len(job.prompt) - cache_n, run.prompt_ms, len(run.pieces), run.predicted_ms)


class StreamEvents:
    """SSE event bytes of one streamed task, in the framing of each endpoint."""

    def __init__(
        self, config: SimConfig, job: Job, run: Run, completion_id: str, token_id: Callable[[str], int]
    ) -> None:
        self._config = config
        self._token_id = token_id
        self._job = job
        self._run = run
        self._id = completion_id
        self._created = unix_now()

    def _common(self) -> dict[str, Any]:
        return {
            "created": self._created,
            "id": self._id,
            "model": self._config.model_id,
            "system_fingerprint": self._config.build_info,
        }

    def chat_chunk(self, delta: dict[str, Any], finish_reason: str | None, **extra: Any) -> bytes:
        choices = [{"finish_reason": finish_reason, "index": 0, "delta": delta}]
        return sse({"choices": choices, **self._common(), "object": "chat.completion.chunk", **extra})

    def _oai_chunk(
        self,
        text: str,
        finish_reason: str | None,
        usage: dict[str, Any] | None = None,
        timing: dict[str, Any] | None = None,
    ) -> bytes:
        common = self._common()
        event: dict[str, Any] = {
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
            "created": common["created"],
            "model": common["model"],
            "system_fingerprint": common["system_fingerprint"],
            "object": "text_completion",
        }
        if usage is not None:
            event["usage"] = usage
        event["id"] = self._id
        if timing is not None:
            event["timings"] = timing
        return sse(event)

    def progress(self, processed: int) -> bytes:
        job, cache_n = self._job, self._run.assignment.cache_n
        total = len(job.prompt)
        return sse(
            {
                "index": 0,
                "content": "",
                "tokens": [0],
                "stop": False,
                "id_slot": -1,
                "tokens_predicted": 0,
                "tokens_evaluated": total,
                "prompt_progress": {
                    "total": total,
                    "cache": cache_n,
                    "processed": cache_n + processed,
                    "time_ms": int(self._run.prompt_ms),
                },
            }
        )

    def piece(self, piece: str, produced: int) -> bytes:
        if self._job.kind == "chat":
            return self.chat_chunk({"content": piece}, None)
        if self._job.kind == "oai":
            return self._oai_chunk(piece, None)
        token = self._token_id(piece.strip() or piece)
        return sse(
            {
                "index": 0,
                "content": piece,
                "tokens": [token],
                "stop": False,
                "id_slot": -1,
                "tokens_predicted": produced,
                "tokens_evaluated": len(self._job.prompt),
            }
        )

    def final(self) -> bytes:
        config, job, run = self._config, self._job, self._run
        if job.kind == "native":
            return sse(native_final(config, job, run, ""))
        usage, timing = job_usage(job, run), job_timings(job, run)
        if job.kind == "oai":
            return self._oai_chunk("", run.finish_reason, usage, timing) + b"data: [DONE]\n\n"
        if job.include_usage:
            last = self.chat_chunk({}, run.finish_reason)
            usage_event = sse(
                {
                    "choices": [],
                    **self._common(),
                    "object": "chat.completion.chunk",
                    "usage": usage,
                    "timings": timing,
                }
            )
            return last + usage_event + b"data: [DONE]\n\n"
        return self.chat_chunk({}, run.finish_reason, timings=timing) + b"data: [DONE]\n\n"
