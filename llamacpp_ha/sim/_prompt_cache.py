from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

from ._text import common_prefix_length

__all__ = ["PromptCache"]

_KEEP_AT_LEAST = 0.25
"""A saved prompt is loaded only if the new prompt keeps this share of it ("don't trash large
prompts", ``server_prompt_cache::load``)."""


class PromptCache:
    """llama-server's RAM prompt cache (``--cache-ram``), shared by a server's slots.

    Follows ``server_prompt_cache`` (``tools/server/server-task.cpp``): a saved prompt is skipped
    when one already saved contains it, and replaces the saved prompt it contains; the oldest go
    when the total passes the limit. Loading *moves* a saved prompt into a slot: it leaves the
    cache, so one saved copy serves one slot until a slot holding it is saved again.

    No saved prompt is a prefix of another, so in sorted order the one a prompt contains, the one
    containing it, and the one sharing its longest beginning are its neighbours: each lookup is a
    binary search, not a scan (idle slots are saved at every task start).
    """

    def __init__(self, limit_tokens: int) -> None:
        self.limit_tokens = limit_tokens
        self._sorted: list[tuple[str, ...]] = []
        self._by_age: dict[int, tuple[str, ...]] = {}
        """The same prompts by identity, oldest first."""
        self.tokens = 0
        """Tokens held, all saved prompts together."""

    def __len__(self) -> int:
        return len(self._sorted)

    def holds(self, state: tuple[str, ...] | None) -> bool:
        """Whether this saved prompt (as :meth:`save` returned it) is still here."""
        return state is not None and self._by_age.get(id(state)) is state

    def save(self, tokens: Sequence[str]) -> tuple[str, ...] | None:
        """Save a slot's prompt; returns the saved prompt that holds it (None: too long to keep)."""
        state = tuple(tokens)
        if not state or len(state) > self.limit_tokens:
            return None
        saved = self._sorted
        at = bisect_left(saved, state)
        if at < len(saved) and saved[at][: len(state)] == state:
            return saved[at]  # held already, or inside a longer saved prompt
        if at and state[: len(saved[at - 1])] == saved[at - 1]:
            self._remove(saved[at - 1])  # the shorter saved prompt it contains
        insort(saved, state)
        self._by_age[id(state)] = state
        self.tokens += len(state)
        while self.tokens > self.limit_tokens:  # never the new one: it fits the limit alone
            self._remove(next(iter(self._by_age.values())))
        return state

    def load(self, prompt: Sequence[str], slot_tokens: Sequence[str], slot_match: int) -> tuple[str, ...] | None:
        """Take the saved prompt sharing the longest beginning with ``prompt`` if it serves it
        better than the slot's own ``slot_tokens`` (of which ``slot_match`` tokens match): it must
        keep more of itself *and* cover more of the prompt. None leaves the slot as it is."""
        if not prompt or not self._sorted:
            return None
        target = tuple(prompt)
        at = bisect_left(self._sorted, target)
        keep_best = slot_match / len(slot_tokens) if slot_tokens else -1.0
        cover_best = slot_match / len(target)
        best = None
        for saved in self._sorted[max(0, at - 1) : at + 1]:
            match = common_prefix_length(saved, target)
            keep, cover = match / len(saved), match / len(target)
            if keep >= _KEEP_AT_LEAST and keep > keep_best and cover > cover_best:
                best, keep_best, cover_best = saved, keep, cover
        if best is not None:
            self._remove(best)
        return best

    def _remove(self, state: tuple[str, ...]) -> None:
        del self._sorted[bisect_left(self._sorted, state)]
        del self._by_age[id(state)]
        self.tokens -= len(state)
