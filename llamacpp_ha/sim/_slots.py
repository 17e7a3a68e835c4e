from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ._config import SimConfig
from ._text import common_prefix_length

__all__ = ["Assignment", "SimSlot", "SlotPool"]


@dataclass
class SimSlot:
    id: int
    n_ctx: int
    is_processing: bool = False
    tokens: list[str] = field(default_factory=list)
    """What the slot's KV cache holds: the last prompt plus what was generated after it."""
    id_task: int | None = None
    last_used: float = 0.0
    n_prompt_tokens_processed: int = 0
    n_prompt_tokens_cache: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    n_decoded: int = 0
    n_remain: int = -1


@dataclass(frozen=True)
class Assignment:
    slot: SimSlot
    cache_n: int
    """Prompt tokens that come from a cache (the slot's own KV or the shared RAM cache)."""


@dataclass
class _Deferred:
    id_slot: int | None
    prompt: list[str]
    future: asyncio.Future[Assignment]


class SlotPool:
    """The slots of one simulated server and the queue of tasks deferred until one is idle.

    Follows llama-server's ``get_available_slot``: a pinned ``id_slot`` (wrapping modulo the
    slot count) waits for that slot even when others are idle; otherwise the idle slot whose
    cached prompt shares the largest fraction of the new prompt (above the similarity
    threshold), else the least recently used one. A released slot takes the first deferred
    task pinned to it, else the oldest task.
    """

    def __init__(self, config: SimConfig) -> None:
        self._config = config
        self.slots = [SimSlot(id=i, n_ctx=config.n_ctx) for i in range(config.slots)]
        self._deferred: deque[_Deferred] = deque()
        self._ram_cache: deque[tuple[str, ...]] = deque()
        self._ram_cache_tokens = 0
        self._ram_cache_limit = config.cache_ram_mib * 1024 * 1024 // config.kv_bytes_per_token
        """The RAM cache's size in tokens."""
        self._next_task = 0
        self.peak_deferred = 0
        """The most tasks ever deferred at once."""
        self.deferred_total = 0
        """Tasks that had to wait inside the server for a slot."""
        self.prefilling = 0
        """Slots processing a prompt right now (they share the prefill compute)."""

    @property
    def processing(self) -> int:
        return sum(slot.is_processing for slot in self.slots)

    @property
    def deferred(self) -> int:
        return len(self._deferred)

    async def acquire(self, prompt: list[str], id_slot: int | None) -> Assignment:
        """Take a slot for a task, waiting in the deferred queue while none fits."""
        slot = self._pick(prompt, id_slot)
        if slot is not None:
            return self._assign(slot, prompt)
        future: asyncio.Future[Assignment] = asyncio.get_running_loop().create_future()
        entry = _Deferred(id_slot, prompt, future)
        self._deferred.append(entry)
        self.deferred_total += 1
        self.peak_deferred = max(self.peak_deferred, len(self._deferred))
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result().slot)
            elif entry in self._deferred:
                self._deferred.remove(entry)
            raise

    def release(self, slot: SimSlot) -> None:
        slot.is_processing = False
        slot.last_used = time.monotonic()
        self._start_deferred(slot)

    def _start_deferred(self, freed: SimSlot) -> None:
        chosen = next((e for e in self._deferred if e.id_slot is not None and self._wrap(e.id_slot) == freed.id), None)
        if chosen is None:
            chosen = next((e for e in self._deferred if e.id_slot is None), None)
        if chosen is None:
            return
        self._deferred.remove(chosen)
        if chosen.future.done():
            return
        chosen.future.set_result(self._assign(freed, chosen.prompt))

    def _save(self, tokens: tuple[str, ...]) -> None:
        if len(tokens) > self._ram_cache_limit:
            return
        self._ram_cache.append(tokens)
        self._ram_cache_tokens += len(tokens)
        while self._ram_cache_tokens > self._ram_cache_limit:
            self._ram_cache_tokens -= len(self._ram_cache.popleft())

    @property
    def ram_cache_tokens(self) -> int:
        return self._ram_cache_tokens

    def _wrap(self, id_slot: int) -> int:
        return id_slot % len(self.slots)

    def _pick(self, prompt: list[str], id_slot: int | None) -> SimSlot | None:
        if id_slot is not None and id_slot >= 0:
            slot = self.slots[self._wrap(id_slot)]
            return None if slot.is_processing else slot
        idle = [slot for slot in self.slots if not slot.is_processing]
        if not idle:
            return None
        threshold = self._config.slot_prompt_similarity
        if threshold > 0 and prompt:
            best, best_similarity = None, 0.0
            for slot in idle:
                similarity = common_prefix_length(slot.tokens, prompt) / len(prompt)
                if similarity > best_similarity:
                    best, best_similarity = slot, similarity
            if best is not None and best_similarity > threshold:
                return best
        return min(idle, key=lambda slot: slot.last_used)

    def _assign(self, slot: SimSlot, prompt: list[str]) -> Assignment:
        cached = common_prefix_length(slot.tokens, prompt)
        if self._ram_cache_limit:
            # llama-server saves a slot's state to the RAM cache before another prompt
            # overwrites most of it, and loads the best saved prompt if it matches better.
            if slot.tokens and cached < len(slot.tokens) / 2:
                self._save(tuple(slot.tokens))
            for saved in self._ram_cache:
                cached = max(cached, common_prefix_length(saved, prompt))
        # At least one prompt token is always evaluated again.
        cached = max(0, min(cached, len(prompt) - 1))
        self._next_task += 1
        slot.is_processing = True
        slot.id_task = self._next_task
        slot.tokens = list(prompt)
        slot.n_prompt_tokens_cache = cached
        slot.n_prompt_tokens_processed = 0
        slot.n_decoded = 0
        return Assignment(slot, cached)
