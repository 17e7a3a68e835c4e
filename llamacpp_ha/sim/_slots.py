from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from ._config import SimConfig
from ._prompt_cache import PromptCache
from ._text import common_prefix_length

__all__ = ["Assignment", "SimSlot", "SlotPool"]

_Taken = Literal["similar", "lru", "pinned"]
"""How a task got its slot (llama-server's ``get_available_slot``): by prompt similarity, as the
least recently used idle slot, or pinned by ``id_slot`` to a slot whose prompt is not similar."""


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
    saved: tuple[str, ...] | None = None
    """The RAM cache's copy of what the slot holds, once saved there while the slot was idle."""


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
        self._ram_cache = PromptCache(config.cache_ram_mib * 1024 * 1024 // config.kv_bytes_per_token)
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
        picked = self._pick(prompt, id_slot)
        if picked is not None:
            return self._assign(*picked, prompt)
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
        taken = self._taken(freed, chosen.prompt, pinned=chosen.id_slot is not None)
        chosen.future.set_result(self._assign(freed, taken, chosen.prompt))

    @property
    def ram_cache_tokens(self) -> int:
        return self._ram_cache.tokens

    def _wrap(self, id_slot: int) -> int:
        return id_slot % len(self.slots)

    def _pick(self, prompt: list[str], id_slot: int | None) -> tuple[SimSlot, _Taken] | None:
        """The slot for a task and how it was taken (llama-server's ``get_available_slot``)."""
        if id_slot is not None and id_slot >= 0:
            slot = self.slots[self._wrap(id_slot)]
            return None if slot.is_processing else (slot, self._taken(slot, prompt, pinned=True))
        idle = [slot for slot in self.slots if not slot.is_processing]
        if not idle:
            return None
        threshold = self._config.slot_prompt_similarity
        if threshold > 0 and prompt:
            best, best_similarity = None, 0.0
            for slot in idle:
                similarity = self._similarity(slot, prompt)
                if similarity > best_similarity:
                    best, best_similarity = slot, similarity
            if best is not None and best_similarity > threshold:
                return best, "similar"
        return min(idle, key=lambda slot: slot.last_used), "lru"

    def _taken(self, slot: SimSlot, prompt: list[str], *, pinned: bool) -> _Taken:
        """How a task given this slot counts as having taken it."""
        threshold = self._config.slot_prompt_similarity
        if threshold > 0 and self._similarity(slot, prompt) > threshold:
            return "similar"
        return "pinned" if pinned else "lru"

    @staticmethod
    def _similarity(slot: SimSlot, prompt: list[str]) -> float:
        return common_prefix_length(slot.tokens, prompt) / len(prompt) if prompt else 0.0

    def _assign(self, slot: SimSlot, taken: _Taken, prompt: list[str]) -> Assignment:
        cached = common_prefix_length(slot.tokens, prompt)
        # llama-server updates the RAM cache (saves the slot's prompt, loads a better saved one)
        # when the slot is taken by LRU, or by similarity while keeping under half of its prompt.
        keeps_under_half = bool(slot.tokens) and cached < len(slot.tokens) / 2
        update_cache = taken == "lru" or (taken == "similar" and keeps_under_half)
        if self._ram_cache.limit_tokens and update_cache:
            self._ram_cache.save(slot.tokens)
            loaded = self._ram_cache.load(prompt, slot.tokens, cached)
            if loaded is not None:
                cached = common_prefix_length(loaded, prompt)
        # At least one prompt token is always evaluated again.
        cached = max(0, min(cached, len(prompt) - 1))
        self._next_task += 1
        slot.is_processing = True
        slot.id_task = self._next_task
        slot.tokens = list(prompt)
        slot.saved = None
        slot.n_prompt_tokens_cache = cached
        slot.n_prompt_tokens_processed = 0
        slot.n_decoded = 0
        if self._ram_cache.limit_tokens and self._config.cache_idle_slots:
            for idle in self.slots:
                if not idle.is_processing and not self._ram_cache.holds(idle.saved):
                    idle.saved = self._ram_cache.save(idle.tokens)
        return Assignment(slot, cached)
