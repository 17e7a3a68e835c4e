"""Which prompt blocks each backend is believed to hold in its prompt caches.

llama-server publishes no cache events, so the index is a belief: a request's blocks are
recorded on the backend it is sent to, each backend keeps a bounded LRU sized from what it
can hold (slots x context, plus its RAM prompt cache), and ``timings.cache_n`` from each
response corrects the belief (a backend that hits less than expected is believed to hold less).

Blocks are inserted deepest first, so a prompt's first block is always more recent than its
later ones: eviction removes the tail of a prompt before its head, and the blocks a backend
holds of one prompt are always a prefix of it. That makes the longest match a binary search.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["PrefixIndex"]

_SHRINK = 0.8
_GROW = 1.02


class _BackendBlocks:
    __slots__ = ("blocks", "ceiling", "limit")

    def __init__(self, ceiling: int) -> None:
        self.blocks: OrderedDict[bytes, None] = OrderedDict()
        self.ceiling = ceiling
        """What the backend can hold, from its slots and context."""
        self.limit = float(ceiling)
        """What it is believed to hold: the ceiling, shrunk by observed misses."""


class PrefixIndex:
    """Per backend, a bounded LRU of block hashes; per block, the backends holding it."""

    def __init__(self) -> None:
        self._backends: dict[str, _BackendBlocks] = {}
        self._holders: dict[bytes, set[str]] = {}

    def _entry(self, backend: str) -> _BackendBlocks:
        entry = self._backends.get(backend)
        if entry is None:
            entry = self._backends[backend] = _BackendBlocks(1024)
        return entry

    def size(self, backend: str) -> int:
        entry = self._backends.get(backend)
        return len(entry.blocks) if entry else 0

    def limit(self, backend: str) -> int:
        return int(self._entry(backend).limit)

    def set_ceiling(self, backend: str, blocks: int) -> None:
        """What the backend can hold, in blocks (from ``/props`` and the learned token ratio)."""
        entry = self._entry(backend)
        blocks = max(16, blocks)
        if blocks != entry.ceiling:
            entry.limit = min(float(blocks), entry.limit * blocks / entry.ceiling)
            entry.ceiling = blocks
            self._evict(backend, entry)

    def match(self, backend: str, blocks: Sequence[bytes]) -> int:
        """How many leading blocks of the prompt the backend holds."""
        entry = self._backends.get(backend)
        if entry is None or not blocks or blocks[0] not in entry.blocks:
            return 0
        held = entry.blocks
        low, high = 1, len(blocks)
        while low < high:
            middle = (low + high + 1) // 2
            if blocks[middle - 1] in held:
                low = middle
            else:
                high = middle - 1
        return low

    def holders(self, block: bytes) -> set[str]:
        """Backends holding this block (and so the whole prompt up to its end)."""
        return self._holders.get(block, set())

    def insert(self, backend: str, blocks: Sequence[bytes]) -> None:
        """The backend now holds this prompt (it was just sent there)."""
        entry = self._entry(backend)
        held = entry.blocks
        for block in reversed(blocks):
            if block in held:
                held.move_to_end(block)
            else:
                held[block] = None
                self._holders.setdefault(block, set()).add(backend)
        self._evict(backend, entry)

    def observe(self, backend: str, expected_blocks: int, actual_blocks: int) -> None:
        """Correct the belief with what a response reported (``timings.cache_n`` in blocks)."""
        entry = self._entry(backend)
        if expected_blocks >= 2 and actual_blocks < expected_blocks // 2:
            entry.limit = max(16.0, entry.limit * _SHRINK)
            self._evict(backend, entry)
        elif actual_blocks >= expected_blocks:
            entry.limit = min(float(entry.ceiling), entry.limit * _GROW)

    def clear(self, backend: str) -> None:
        """The backend restarted: its caches are empty."""
        entry = self._backends.get(backend)
        if entry is None:
            return
        for block in entry.blocks:
            self._drop_holder(block, backend)
        entry.blocks.clear()
        entry.limit = float(entry.ceiling)

    def _evict(self, backend: str, entry: _BackendBlocks) -> None:
        held = entry.blocks
        while len(held) > entry.limit:
            block, _ = held.popitem(last=False)
            self._drop_holder(block, backend)

    def _drop_holder(self, block: bytes, backend: str) -> None:
        holders = self._holders.get(block)
        if holders is not None:
            holders.discard(backend)
            if not holders:
                del self._holders[block]
