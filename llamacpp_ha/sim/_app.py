from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs

from ._config import SimConfig
from ._protocol import (
    DEFAULT_PARAMS,
    dumps,
    error_body,
    generation_settings,
    metrics_text,
    models_body,
    new_completion_id,
    props_body,
    slots_body,
    timings,
    unix_now,
)
from ._slots import Assignment, SlotPool
from ._text import generated_pieces, render_chat, tokenize

__all__ = ["SimFaults", "SimulatedLlamaServer"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Kind = Literal["chat", "oai", "native"]

_JSON = b"application/json; charset=utf-8"
_PUBLIC_PATHS = frozenset({"/health", "/v1/health"})
_MIN_SLEEP_S = 0.001


@dataclass
class SimFaults:
    """Failures a test can switch on while the server runs."""

    stream_error_after_tokens: int | None = None
    """Streams send an error event after this many tokens and end, as llama-server does on a failure."""


@dataclass
class _Job:
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
class _Run:
    """What one task did, for the final event's timings and usage."""

    assignment: Assignment
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0
    pieces: list[str] = field(default_factory=list)
    truncated: bool = False
    finish_reason: str = "length"


class SimulatedLlamaServer:
    """An ASGI app that speaks llama-server b11312's HTTP protocol, with simulated timing.

    Faithful in what a load balancer sees: paths, JSON shapes, SSE framing, error bodies,
    the loading phase, API keys, ``/slots`` busy flags, requests deferred inside the server
    (counted in ``/metrics``), a per-slot prompt cache reported in ``timings.cache_n``, and
    decode speed falling as streams share the server. Simplified: tokens are words, ``n > 1``
    shares one slot, and the TCP connection is kept after a stream (the real server closes it).
    """

    def __init__(self, config: SimConfig | None = None, **overrides: Any) -> None:
        base = config or SimConfig()
        self.config = base.model_copy(update=overrides) if overrides else base
        SimConfig.model_validate(self.config.model_dump())
        self.pool = SlotPool(self.config)
        self.faults = SimFaults()
        self.inference_requests = 0
        """Completion requests received (a test counts attempts with this)."""
        self._started = time.monotonic()
        self._created = unix_now()
        self._counters: dict[str, float] = {}
        self._pieces_by_id: dict[int, str] = {}

    def restart_loading(self) -> None:
        """Start the loading phase again, as a restarted server would."""
        self._started = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        origin = _header(scope, b"origin") or b""
        method: str = scope["method"]
        path: str = scope["path"]
        if method == "OPTIONS":
            await _send_preflight(send, origin)
            return
        if time.monotonic() - self._started < self.config.loading_s:
            body = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
            await _send_json(send, 503, body, origin)
            return
        if path not in _PUBLIC_PATHS and not self._authorized(scope):
            body = {"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}}
            await _send_json(send, 401, body, origin)
            return
        await self._route(scope, receive, send, method, path, origin)

    def _authorized(self, scope: Scope) -> bool:
        if self.config.api_key is None:
            return True
        authorization = _header(scope, b"authorization")
        if authorization is not None:
            key = authorization.decode().removeprefix("Bearer ")
        else:
            key = (_header(scope, b"x-api-key") or b"").decode()
        return key == self.config.api_key

    async def _route(
        self, scope: Scope, receive: Receive, send: Send, method: str, path: str, origin: bytes
    ) -> None:
        if method == "GET":
            await self._get(scope, send, path, origin)
            return
        body = await _read_body(receive)
        if method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
            await self._complete("chat", body, receive, send, origin)
        elif method == "POST" and path == "/v1/completions":
            await self._complete("oai", body, receive, send, origin)
        elif method == "POST" and path in ("/completion", "/completions"):
            await self._complete("native", body, receive, send, origin)
        elif method == "POST" and path in ("/tokenize", "/detokenize", "/apply-template"):
            await self._text_tool(path, body, send, origin)
        elif method == "POST" and path == "/v1/chat/completions/input_tokens":
            parsed = _parse_json(body)
            messages = parsed.get("messages", []) if isinstance(parsed, dict) else []
            count = len(tokenize(render_chat(messages))) if isinstance(messages, list) else 0
            await _send_json(send, 200, {"input_tokens": count, "object": "response.input_tokens"}, origin)
        elif method == "POST" and path in ("/v1/embeddings", "/embeddings"):
            message = "This server does not support embeddings. Start it with `--embeddings`"
            await _send_json(send, 501, error_body(501, message, "not_supported_error"), origin)
        elif method == "POST" and path == "/props":
            message = "This server does not support changing global properties. Start it with `--props`"
            await _send_json(send, 501, error_body(501, message, "not_supported_error"), origin)
        else:
            await _send_not_found(send, origin)

    async def _get(self, scope: Scope, send: Send, path: str, origin: bytes) -> None:
        if path in ("/health", "/v1/health"):
            await _send_json(send, 200, {"status": "ok"}, origin)
        elif path in ("/v1/models", "/models"):
            await _send_json(send, 200, models_body(self.config, self._created), origin)
        elif path == "/props":
            await _send_json(send, 200, props_body(self.config), origin)
        elif path == "/slots":
            await self._get_slots(scope, send, origin)
        elif path == "/metrics":
            if not self.config.metrics:
                message = "This server does not support metrics endpoint. Start it with `--metrics`"
                await _send_json(send, 501, error_body(501, message, "not_supported_error"), origin)
                return
            values = self._counters | {
                "requests_processing": self.pool.processing,
                "requests_deferred": self.pool.deferred,
            }
            headers = [(b"process-start-time-unix", str(int(self._started)).encode())]
            await _send(
                send, 200, metrics_text(values).encode(), b"text/plain; version=0.0.4", origin, headers
            )
        else:
            await _send_not_found(send, origin)

    async def _get_slots(self, scope: Scope, send: Send, origin: bytes) -> None:
        if not self.config.slots_endpoint:
            message = "This server does not support slots endpoint. Start it with `--slots`"
            await _send_json(send, 501, error_body(501, message, "not_supported_error"), origin)
            return
        query = parse_qs(scope.get("query_string", b"").decode())
        if (
            query.get("fail_on_no_slot", ["0"])[0] not in ("0", "")
            and self.pool.processing == self.config.slots
        ):
            await _send_json(send, 503, error_body(503, "no slot available", "unavailable_error"), origin)
            return
        await _send_json(send, 200, slots_body(self.pool.slots), origin)

    async def _text_tool(self, path: str, raw: bytes, send: Send, origin: bytes) -> None:
        body = _parse_json(raw)
        if not isinstance(body, dict):
            await _send_json(send, 500, error_body(500, "invalid JSON body", "server_error"), origin)
            return
        if path == "/apply-template":
            messages = body.get("messages", [])
            await _send_json(
                send, 200, {"prompt": render_chat(messages if isinstance(messages, list) else [])}, origin
            )
        elif path == "/tokenize":
            pieces = tokenize(str(body.get("content", "")))
            if body.get("add_special"):
                pieces.insert(0, "<s>")
            ids = [self._token_id(piece) for piece in pieces]
            tokens: list[Any] = (
                [{"id": i, "piece": p} for i, p in zip(ids, pieces, strict=True)]
                if body.get("with_pieces")
                else ids
            )
            await _send_json(send, 200, {"tokens": tokens}, origin)
        else:
            ids = body.get("tokens", [])
            text = "".join(" " + self._pieces_by_id.get(i, "") for i in ids if isinstance(i, int))
            await _send_json(send, 200, {"content": text}, origin)

    def _token_id(self, piece: str) -> int:
        token_id = 1 if piece == "<s>" else zlib.crc32(piece.encode()) % 31_000 + 1_000
        self._pieces_by_id[token_id] = piece
        return token_id

    async def _complete(self, kind: Kind, raw: bytes, receive: Receive, send: Send, origin: bytes) -> None:
        job_or_error = self._parse_job(kind, raw)
        if not isinstance(job_or_error, _Job):
            status, error = job_or_error
            await _send_json(send, status, error, origin)
            return
        job = job_or_error
        self.inference_requests += 1
        n_ctx = self.config.n_ctx
        if len(job.prompt) >= n_ctx:
            message = (
                f"request ({len(job.prompt)} tokens) exceeds the available context size ({n_ctx} tokens), "
                "try increasing it"
            )
            extra = {"n_prompt_tokens": len(job.prompt), "n_ctx": n_ctx}
            await _send_json(
                send, 400, error_body(400, message, "exceed_context_size_error", **extra), origin
            )
            return
        assignment = await self.pool.acquire(job.prompt, job.id_slot)
        if not job.cache_prompt:
            assignment = Assignment(assignment.slot, 0)
        slot = assignment.slot
        slot.params = {
            "n_predict": job.max_tokens or -1,
            "max_tokens": job.max_tokens or -1,
            "stream": job.stream,
            "seed": job.seed if job.seed is not None else DEFAULT_PARAMS["seed"],
        }
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.pool.release(slot)

        disconnected = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, disconnected))
        try:
            run = _Run(assignment)
            if job.stream:
                await self._stream(job, run, send, origin, disconnected, release)
            else:
                await self._respond(job, run, send, origin, disconnected, release)
        finally:
            watcher.cancel()
            release()

    def _parse_job(self, kind: Kind, raw: bytes) -> _Job | tuple[int, dict[str, Any]]:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            # llama-server maps a JSON parse failure to 500, not 400 (a quirk the balancer hides).
            return 500, error_body(
                500, f"[json.exception.parse_error.101] parse error: {exc}", "server_error"
            )
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
        if not isinstance(choices, int) or not 1 <= choices <= self.config.slots:
            message = f"Field 'n': Value must be between 1 <= value <= {self.config.slots}, but got {choices}"
            return 400, error_body(400, message, "invalid_request_error")
        limit = body.get("max_tokens", body.get("n_predict", body.get("max_completion_tokens")))
        id_slot = body.get("id_slot")
        stream_options = body.get("stream_options") or {}
        return _Job(
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

    async def _generate(
        self,
        job: _Job,
        run: _Run,
        disconnected: asyncio.Event,
        on_progress: Callable[[int], Awaitable[None]] | None,
    ) -> AsyncIterator[str]:
        """Sleep through prefill, then yield generated pieces at the simulated decode speed."""
        config = self.config
        prompt_n = len(job.prompt) - run.assignment.cache_n
        slot = run.assignment.slot
        started = time.perf_counter()
        if on_progress is not None:
            await on_progress(0)
        await _sleep(prompt_n / config.prefill_tokens_per_s)
        slot.n_prompt_tokens_processed = prompt_n
        if on_progress is not None:
            await on_progress(prompt_n)
        run.prompt_ms = (time.perf_counter() - started) * 1000
        self._count("prompt_tokens_total", prompt_n)
        self._count("prompt_tokens_cached_total", run.assignment.cache_n)
        self._count("prompt_seconds_total", run.prompt_ms / 1000)

        room = config.n_ctx - len(job.prompt)
        wanted = job.max_tokens if job.max_tokens is not None else config.default_max_tokens
        count = min(wanted, room)
        run.truncated = wanted > room
        run.finish_reason = "length" if job.max_tokens is not None or run.truncated else "stop"
        slot.n_remain = count
        decode_started = time.perf_counter()
        debt = 0.0
        for piece in generated_pieces(job.seed, count):
            if job.stream and disconnected.is_set():
                return
            busy = max(1, self.pool.processing)
            debt += 1.0 / (config.decode_tokens_per_s * busy**-config.decode_concurrency_exponent)
            if debt >= _MIN_SLEEP_S:
                await asyncio.sleep(debt)
                debt = 0.0
            run.pieces.append(piece)
            slot.tokens.append(piece)
            slot.n_decoded += 1
            slot.n_remain -= 1
            yield piece
        run.predicted_ms = (time.perf_counter() - decode_started) * 1000
        self._count("tokens_predicted_total", len(run.pieces))
        self._count("tokens_predicted_seconds_total", run.predicted_ms / 1000)
        self._count("n_decode_total", len(run.pieces) + 1)
        self._counters["n_tokens_max"] = max(self._counters.get("n_tokens_max", 0), len(slot.tokens))

    def _count(self, name: str, value: float) -> None:
        self._counters[name] = self._counters.get(name, 0) + value

    async def _respond(
        self,
        job: _Job,
        run: _Run,
        send: Send,
        origin: bytes,
        disconnected: asyncio.Event,
        release: Callable[[], None],
    ) -> None:
        abandoned_at: float | None = None
        async for _ in self._generate(job, run, disconnected, None):
            if disconnected.is_set():
                abandoned_at = abandoned_at or time.monotonic()
                if time.monotonic() - abandoned_at >= self.config.disconnect_check_s:
                    return
        release()
        await _send_json(send, 200, self._final_body(job, run), origin)

    def _final_body(self, job: _Job, run: _Run) -> dict[str, Any]:
        text = "".join(run.pieces)
        common = {
            "created": unix_now(),
            "model": self.config.model_id,
            "system_fingerprint": self.config.build_info,
        }
        usage = self._usage(job, run)
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
                "timings": self._timings(job, run),
            }
        if job.kind == "oai":
            choices = [
                {"text": text, "index": i, "logprobs": None, "finish_reason": run.finish_reason}
                for i in range(job.choices)
            ]
            return {
                "choices": choices,
                **common,
                "object": "text_completion",
                "usage": usage,
                "id": new_completion_id(),
                "timings": self._timings(job, run),
            }
        return self._native_final(job, run, text)

    def _native_final(self, job: _Job, run: _Run, content: str) -> dict[str, Any]:
        settings = generation_settings(run.assignment.slot.params)
        return {
            "index": 0,
            "content": content,
            "tokens": [],
            "id_slot": run.assignment.slot.id,
            "stop": True,
            "model": self.config.model_id,
            "tokens_predicted": len(run.pieces),
            "tokens_evaluated": len(job.prompt),
            "generation_settings": settings,
            "prompt": " ".join(job.prompt),
            "has_new_line": False,
            "truncated": run.truncated,
            "stop_type": "limit" if run.finish_reason == "length" else "eos",
            "stopping_word": "",
            "tokens_cached": len(job.prompt) + len(run.pieces),
            "timings": self._timings(job, run),
        }

    def _usage(self, job: _Job, run: _Run) -> dict[str, Any]:
        completion = len(run.pieces) * job.choices
        return {
            "completion_tokens": completion,
            "prompt_tokens": len(job.prompt),
            "total_tokens": completion + len(job.prompt),
            "prompt_tokens_details": {"cached_tokens": run.assignment.cache_n},
        }

    def _timings(self, job: _Job, run: _Run) -> dict[str, Any]:
        cache_n = run.assignment.cache_n
        return timings(cache_n, len(job.prompt) - cache_n, run.prompt_ms, len(run.pieces), run.predicted_ms)

    async def _stream(
        self,
        job: _Job,
        run: _Run,
        send: Send,
        origin: bytes,
        disconnected: asyncio.Event,
        release: Callable[[], None],
    ) -> None:
        # Headers go out when the task has a slot and starts prompt processing, as llama-server does.
        await send({"type": "http.response.start", "status": 200, "headers": _stream_headers(origin)})
        completion_id = new_completion_id()
        events = _StreamEvents(self, job, run, completion_id)
        progress = events.progress if job.kind == "native" and job.return_progress else None

        async def emit(payload: bytes) -> None:
            await send({"type": "http.response.body", "body": payload, "more_body": True})

        async def emit_progress(processed: int) -> None:
            assert progress is not None
            await emit(progress(processed))

        fail_after = self.faults.stream_error_after_tokens
        produced = 0
        async for piece in self._generate(job, run, disconnected, emit_progress if progress else None):
            if fail_after is not None and produced >= fail_after:
                release()
                failure = error_body(500, "simulated failure during generation", "server_error")
                await send({"type": "http.response.body", "body": b"data: " + dumps(failure) + b"\n\n"})
                return
            if produced == 0 and job.kind == "chat":
                await emit(events.chat_chunk({"role": "assistant", "content": None}, None))
            produced += 1
            await emit(events.piece(piece, produced))
        if job.stream and disconnected.is_set():
            return
        release()
        await send({"type": "http.response.body", "body": events.final(), "more_body": False})


class _StreamEvents:
    """SSE event bytes of one streamed task, in the framing of each endpoint."""

    def __init__(self, server: SimulatedLlamaServer, job: _Job, run: _Run, completion_id: str) -> None:
        self._server = server
        self._job = job
        self._run = run
        self._id = completion_id
        self._created = unix_now()

    def _common(self) -> dict[str, Any]:
        return {
            "created": self._created,
            "id": self._id,
            "model": self._server.config.model_id,
            "system_fingerprint": self._server.config.build_info,
        }

    def chat_chunk(self, delta: dict[str, Any], finish_reason: str | None, **extra: Any) -> bytes:
        choices = [{"finish_reason": finish_reason, "index": 0, "delta": delta}]
        return _sse({"choices": choices, **self._common(), "object": "chat.completion.chunk", **extra})

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
        return _sse(event)

    def progress(self, processed: int) -> bytes:
        job, cache_n = self._job, self._run.assignment.cache_n
        total = len(job.prompt)
        return _sse(
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
        token = self._server._token_id(piece.strip() or piece)
        return _sse(
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
        server, job, run = self._server, self._job, self._run
        if job.kind == "native":
            return _sse(server._native_final(job, run, ""))
        usage, timing = server._usage(job, run), server._timings(job, run)
        if job.kind == "oai":
            return self._oai_chunk("", run.finish_reason, usage, timing) + b"data: [DONE]\n\n"
        if job.include_usage:
            last = self.chat_chunk({}, run.finish_reason)
            usage_event = _sse(
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


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + dumps(event) + b"\n\n"


async def _sleep(seconds: float) -> None:
    if seconds >= _MIN_SLEEP_S:
        await asyncio.sleep(seconds)


async def _watch_disconnect(receive: Receive, disconnected: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            return


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _base_headers(origin: bytes, content_type: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"server", b"llama.cpp"),
        (b"access-control-allow-origin", origin),
        (b"content-type", content_type),
    ]


def _stream_headers(origin: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"server", b"llama.cpp"),
        (b"access-control-allow-origin", origin),
        (b"x-accel-buffering", b"no"),
        (b"content-type", b"text/event-stream"),
        (b"keep-alive", b"timeout=5, max=100"),
    ]


async def _send(
    send: Send,
    status: int,
    payload: bytes,
    content_type: bytes,
    origin: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        *(extra or []),
        *_base_headers(origin, content_type),
        (b"content-length", str(len(payload)).encode()),
    ]
    # Errors close the connection; successes advertise keep-alive (as the captures show).
    headers.append((b"connection", b"close") if status >= 400 else (b"keep-alive", b"timeout=5, max=100"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _send_json(send: Send, status: int, body: Any, origin: bytes) -> None:
    await _send(send, status, dumps(body), _JSON, origin)


async def _send_not_found(send: Send, origin: bytes) -> None:
    body = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
    await _send_json(send, 404, body, origin)


async def _send_preflight(send: Send, origin: bytes) -> None:
    headers = [
        (b"server", b"llama.cpp"),
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-credentials", b"true"),
        (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
        (b"access-control-allow-headers", b"*"),
        (b"content-type", b"text/html"),
        (b"keep-alive", b"timeout=5, max=100"),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
