from __future__ import annotations

import asyncio
import math
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from ._asgi import (
    MIN_SLEEP_S,
    Receive,
    Scope,
    Send,
    header,
    lifespan,
    parse_json,
    read_body,
    send_json,
    send_not_found,
    send_preflight,
    send_response,
    sleep_at_least_1ms,
    stream_headers,
    watch_disconnect,
)
from ._bodies import StreamEvents, final_body
from ._config import SimConfig
from ._jobs import Job, Kind, Run, parse_job
from ._protocol import (
    DEFAULT_PARAMS,
    dumps,
    error_body,
    metrics_text,
    models_body,
    new_completion_id,
    props_body,
    slots_body,
    unix_now,
)
from ._slots import Assignment, SlotPool
from ._text import generated_pieces, render_chat, tokenize

__all__ = ["SimFaults", "SimulatedLlamaServer"]

_PREFILL_STEP_S = 0.02
"""How often concurrent prefills re-divide the prefill rate."""


_PUBLIC_PATHS = frozenset({"/health", "/v1/health"})


@dataclass
class SimFaults:
    """Failures a test can switch on while the server runs."""

    stream_error_after_tokens: int | None = None
    """Streams send an error event after this many tokens and end, as llama-server does on a failure."""


class SimulatedLlamaServer:
    """An ASGI app that speaks llama-server b11312's HTTP protocol, with simulated timing.

    Faithful in what a load balancer sees: paths, JSON shapes, SSE framing, error bodies,
    the loading phase, API keys, ``/slots`` busy flags, requests deferred inside the server
    (counted in ``/metrics``), a per-slot prompt cache reported in ``timings.cache_n``, and
    decode speed falling as streams share the server, and the connection closed after each stream.
    Simplified: tokens are words, ``n > 1`` shares one slot.
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
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        origin = header(scope, b"origin") or b""
        method: str = scope["method"]
        path: str = scope["path"]
        if method == "OPTIONS":
            await send_preflight(send, origin)
            return
        if time.monotonic() - self._started < self.config.loading_s:
            body = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
            await send_json(send, 503, body, origin)
            return
        if path not in _PUBLIC_PATHS and not self._authorized(scope):
            body = {"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}}
            await send_json(send, 401, body, origin)
            return
        await self._route(scope, receive, send, method, path, origin)

    def _authorized(self, scope: Scope) -> bool:
        if self.config.api_key is None:
            return True
        authorization = header(scope, b"authorization")
        if authorization is not None:
            key = authorization.decode().removeprefix("Bearer ")
        else:
            key = (header(scope, b"x-api-key") or b"").decode()
        return key == self.config.api_key

    async def _route(self, scope: Scope, receive: Receive, send: Send, method: str, path: str, origin: bytes) -> None:
        if method == "GET":
            await self._get(scope, send, path, origin)
            return
        body = await read_body(receive)
        if method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
            await self._complete("chat", body, receive, send, origin)
        elif method == "POST" and path == "/v1/completions":
            await self._complete("oai", body, receive, send, origin)
        elif method == "POST" and path in ("/completion", "/completions"):
            await self._complete("native", body, receive, send, origin)
        elif method == "POST" and path in ("/tokenize", "/detokenize", "/apply-template"):
            try:
                await self._text_tool(path, body, send, origin)
            except (AttributeError, TypeError) as exc:
                await _send_type_error(send, exc, origin)
        elif method == "POST" and path == "/v1/chat/completions/input_tokens":
            parsed = parse_json(body)
            messages = parsed.get("messages", []) if isinstance(parsed, dict) else []
            try:
                count = len(tokenize(render_chat(messages))) if isinstance(messages, list) else 0
            except (AttributeError, TypeError) as exc:
                await _send_type_error(send, exc, origin)
                return
            await send_json(send, 200, {"input_tokens": count, "object": "response.input_tokens"}, origin)
        elif method == "POST" and path in ("/v1/embeddings", "/embeddings"):
            message = "This server does not support embeddings. Start it with `--embeddings`"
            await send_json(send, 501, error_body(501, message, "not_supported_error"), origin)
        elif method == "POST" and path == "/props":
            message = "This server does not support changing global properties. Start it with `--props`"
            await send_json(send, 501, error_body(501, message, "not_supported_error"), origin)
        else:
            await send_not_found(send, origin)

    async def _get(self, scope: Scope, send: Send, path: str, origin: bytes) -> None:
        if path in ("/health", "/v1/health"):
            await send_json(send, 200, {"status": "ok"}, origin)
        elif path in ("/v1/models", "/models"):
            await send_json(send, 200, models_body(self.config, self._created), origin)
        elif path == "/props":
            await send_json(send, 200, props_body(self.config), origin)
        elif path == "/slots":
            await self._get_slots(scope, send, origin)
        elif path == "/sim/stats":
            # The simulator's own counters: not a llama-server endpoint.
            pool = self.pool
            stats = {
                "requests": self.inference_requests,
                "processing": pool.processing,
                "deferred": pool.deferred,
                "deferred_total": pool.deferred_total,
                "ram_cache_tokens": pool.ram_cache_tokens,
                "peak_deferred": pool.peak_deferred,
            }
            await send_json(send, 200, stats, origin)
        elif path == "/metrics":
            if not self.config.metrics:
                message = "This server does not support metrics endpoint. Start it with `--metrics`"
                await send_json(send, 501, error_body(501, message, "not_supported_error"), origin)
                return
            values = self._counters | {
                "requests_processing": self.pool.processing,
                "requests_deferred": self.pool.deferred,
            }
            headers = [(b"process-start-time-unix", str(int(self._started)).encode())]
            await send_response(send, 200, metrics_text(values).encode(), b"text/plain; version=0.0.4", origin, headers)
        else:
            await send_not_found(send, origin)

    async def _get_slots(self, scope: Scope, send: Send, origin: bytes) -> None:
        if not self.config.slots_endpoint:
            message = "This server does not support slots endpoint. Start it with `--slots`"
            await send_json(send, 501, error_body(501, message, "not_supported_error"), origin)
            return
        query = parse_qs(scope.get("query_string", b"").decode())
        if query.get("fail_on_no_slot", ["0"])[0] not in ("0", "") and self.pool.processing == self.config.slots:
            await send_json(send, 503, error_body(503, "no slot available", "unavailable_error"), origin)
            return
        await send_json(send, 200, slots_body(self.pool.slots), origin)

    async def _text_tool(self, path: str, raw: bytes, send: Send, origin: bytes) -> None:
        body = parse_json(raw)
        if not isinstance(body, dict):
            await send_json(send, 500, error_body(500, "invalid JSON body", "server_error"), origin)
            return
        if path == "/apply-template":
            messages = body.get("messages", [])
            await send_json(send, 200, {"prompt": render_chat(messages if isinstance(messages, list) else [])}, origin)
        elif path == "/tokenize":
            pieces = tokenize(str(body.get("content", "")))
            if body.get("add_special"):
                pieces.insert(0, "<s>")
            ids = [self._token_id(piece) for piece in pieces]
            tokens: list[Any] = (
                [{"id": i, "piece": p} for i, p in zip(ids, pieces, strict=True)] if body.get("with_pieces") else ids
            )
            await send_json(send, 200, {"tokens": tokens}, origin)
        else:
            ids = body.get("tokens", [])
            text = "".join(" " + self._pieces_by_id.get(i, "") for i in ids if isinstance(i, int))
            await send_json(send, 200, {"content": text}, origin)

    def _token_id(self, piece: str) -> int:
        token_id = 1 if piece == "<s>" else zlib.crc32(piece.encode()) % 31_000 + 1_000
        self._pieces_by_id[token_id] = piece
        return token_id

    async def _complete(self, kind: Kind, raw: bytes, receive: Receive, send: Send, origin: bytes) -> None:
        job_or_error = parse_job(self.config, kind, raw)
        if not isinstance(job_or_error, Job):
            status, error = job_or_error
            await send_json(send, status, error, origin)
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
            await send_json(send, 400, error_body(400, message, "exceed_context_size_error", **extra), origin)
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
        watcher = asyncio.create_task(watch_disconnect(receive, disconnected))
        try:
            run = Run(assignment)
            if job.stream:
                await self._stream(job, run, send, origin, disconnected, release)
            else:
                await self._respond(job, run, send, origin, disconnected, release)
        finally:
            watcher.cancel()
            release()

    async def _generate(
        self,
        job: Job,
        run: Run,
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
        await self._prefill(prompt_n, run.assignment.cache_n)
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
            token_s = 1 / (config.decode_tokens_per_s * busy**-config.decode_concurrency_exponent)
            if self.pool.prefilling:
                stall_ms = config.decode_token_ms_while_prefilling
                token_s = (
                    max(token_s, stall_ms / 1000) if stall_ms is not None else token_s * config.prefill_slows_decode
                )
            debt += token_s
            if debt >= MIN_SLEEP_S:
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

    def prefill_alone_s(self, tokens: int, cached: int) -> float:
        """Seconds to process ``tokens`` new prompt tokens after ``cached`` ones, with the server to itself."""
        curve = self.config.prefill_curve_ms
        if curve is not None:
            t0, a, b = curve
            return (t0 + a * tokens + b * ((cached + tokens) ** 2 - cached**2)) / 1000
        return tokens / self.config.prefill_tokens_per_s

    async def _prefill(self, tokens: int, cached: int = 0) -> None:
        """Process ``tokens`` prompt tokens; slots prefilling at the same time share the compute."""
        if tokens <= 0 or math.isinf(self.config.prefill_tokens_per_s):
            return
        pool = self.pool
        pool.prefilling += 1
        try:
            remaining = self.prefill_alone_s(tokens, cached)
            while remaining > 0:
                share = 1 / pool.prefilling
                step = min(remaining / share, _PREFILL_STEP_S)
                await sleep_at_least_1ms(step)
                remaining -= share * step
        finally:
            pool.prefilling -= 1

    def _count(self, name: str, value: float) -> None:
        self._counters[name] = self._counters.get(name, 0) + value

    async def _respond(
        self,
        job: Job,
        run: Run,
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
        await send_json(send, 200, final_body(self.config, job, run), origin)

    async def _stream(
        self,
        job: Job,
        run: Run,
        send: Send,
        origin: bytes,
        disconnected: asyncio.Event,
        release: Callable[[], None],
    ) -> None:
        # Headers go out when the task has a slot and starts prompt processing, as llama-server does.
        await send({"type": "http.response.start", "status": 200, "headers": stream_headers(origin)})
        completion_id = new_completion_id()
        events = StreamEvents(self.config, job, run, completion_id, self._token_id)
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


async def _send_type_error(send: Send, exc: Exception, origin: bytes) -> None:
    """llama-server's handlers throw on a body of the wrong shape; its wrapper answers 500."""
    await send_json(send, 500, error_body(500, f"[json.exception.type_error] {exc}", "server_error"), origin)
