"""Which prompt blocks each backend is believed to hold in its prompt caches.

llama-server publishes no cache events, so the index is a belief: a request's blocks are
recorded on the backend it is sent to, each backend keeps a bounded LRU sized from what it
can hold (slots x context, plus its RAM prompt cache), and ``timings.cache_n`` from each
response corrects the belief (a backend that hits less than expected is believed to hold less).

Blocks are inserted deepest first, so a prompt's first block is always more recent than its
later ones: eviction removes the tail of a prompt before its head, and the blocks a backend
holds of one prompt are always a prefix of it. That makes the longest match a binary search.

llama-server caches one prompt per slot, and a running request's slot is not shared: two
requests with the same beginning at once need two slots holding it. The index counts the
*copies* of each prompt beginning a backend holds (a request that found none free was processed
into a new slot), so the scheduler can tell a copy it may use from one a running request holds.
A backend with a RAM prompt cache (``--cache-ram``, on by default) holds one more: a slot's prompt
is saved there when a task starts that does not reuse that slot (``--cache-idle-slots``, or the
slot being overwritten), and a request that finds no free slot copy moves the saved one into its
slot (``server_prompt_cache::load`` erases it).

A slot holds one prompt, whatever its length, so the copies a backend holds are also bounded by
its slots: a task that takes a slot not holding its prompt overwrites the least recently used
idle one (``get_available_slot``), and that slot's prompt is gone (or, with a RAM cache, saved
there). A bound in blocks alone would believe a backend of 16 slots holds 24 prompts when prompts
are shorter than its context, and send sessions to a backend that evicted them.

Past its last full block a prompt ends in a partial block no block hash covers; its end mark
(see ``PromptShape.end``) is kept beside the blocks, so the next turn of a conversation shorter
than a few blocks still finds the backend holding the turn before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

__all__ = ["PrefixIndex"]

_SHRINK = 0.8
_GROW = 1.02
_FLOOR = 0.25
"""Misses shrink what a backend is believed to hold to this share of its ceiling, not below: a miss
also comes from a slot overwritten before we came back, and a belief shrunk below one prompt per
slot forgets every prompt and finds nothing again."""
_ENDS_PER_BLOCK = 0.25
"""End marks kept per block of capacity: one per prompt of four blocks or more."""
InUse = Callable[[bytes], int]
_UNTRACKED = b""
"""Stands for the prompts without a block (shorter than one): they take slots too."""


class _BackendBlocks:
    __slots__ = ("blocks", "ceiling", "copies", "ends", "idle", "in_slots", "limit", "saved", "slot_order", "slots")

    def __init__(self, ceiling: int) -> None:
        self.blocks: OrderedDict[bytes, None] = OrderedDict()
        self.ends: OrderedDict[bytes, int] = OrderedDict()
        """End marks of the prompts it served, with their positions in bytes."""
        self.copies: dict[bytes, int] = {}
        """First block -> how many slots hold a prompt beginning with it."""
        self.slot_order: OrderedDict[bytes, None] = OrderedDict()
        """The first blocks in ``copies`` (and ``_UNTRACKED``), least recently used slot first."""
        self.in_slots = 0
        """Slots believed to hold a prompt: the sum of ``copies``."""
        self.slots = 0
        """The backend's slots (0: not known yet, no bound)."""
        self.saved: set[bytes] = set()
        """First blocks of the prompts believed saved in its RAM prompt cache, one copy each."""
        self.idle: set[bytes] = set()
        """First blocks of prompts whose slot went idle since the last task started there: the
        next task that does not reuse the slot saves them to the RAM cache."""
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

    def set_slots(self, backend: str, slots: int) -> None:
        """How many slots the backend has (from ``/props``): at most that many prompts in them."""
        self._entry(backend).slots = max(0, slots)

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

    def held_bytes(self, backend: str, marks: Sequence[tuple[int, bytes]], matched: int, block_bytes: int) -> int:
        """How many bytes of the prompt the backend holds, given its ``matched`` full blocks: more
        when it served a prompt that ended inside the next block and that this prompt continues."""
        held = matched * block_bytes
        entry = self._backends.get(backend)
        if entry is None or not entry.ends:
            return held
        ends = entry.ends
        for position, mark in reversed(marks):
            if position <= held:
                break
            # A mark past the next block would need blocks the backend does not hold.
            if position < held + block_bytes and mark in ends:
                return position
        return held

    def end_holders(self, marks: Sequence[tuple[int, bytes]], beyond: int) -> set[str]:
        """Backends that served a prompt ending past ``beyond`` bytes that this prompt continues."""
        found: set[str] = set()
        for position, mark in marks:
            if position > beyond:
                found.update(self._holders.get(mark, ()))
        return found

    def copies(self, backend: str, first_block: bytes) -> int:
        """How many slots of the backend are believed to hold a prompt beginning with this block."""
        entry = self._backends.get(backend)
        return entry.copies.get(first_block, 0) if entry is not None else 0

    def saved(self, backend: str, first_block: bytes) -> bool:
        """Whether the backend's RAM prompt cache is believed to hold a prompt beginning with this block."""
        entry = self._backends.get(backend)
        return entry is not None and first_block in entry.saved

    def task_started(
        self,
        backend: str,
        first_block: bytes | None,
        *,
        reused_copy: bool,
        taking: int = 0,
        in_use: InUse | None = None,
        ram_cache: bool = False,
    ) -> None:
        """A task starts on the backend. llama-server saves the idle slots to its RAM cache, all but
        the one the task reuses (``reused_copy``: it holds ``first_block``, now the most recently
        used). A task that does not reuse one takes a slot that held something else: ``taking`` is
        the slots our running tasks took that way, this one included, and the least recently used
        idle prompts leave the slots until those fit (``ram_cache``: into the backend's RAM cache;
        ``in_use``: how many copies of a prompt beginning our running tasks use)."""
        entry = self._backends.get(backend)
        if entry is None:
            return
        if entry.idle:
            kept = first_block if reused_copy and first_block in entry.idle else None
            entry.saved.update(block for block in entry.idle if block != kept)
            entry.idle = {kept} if kept is not None else set()
        if reused_copy and first_block is not None:
            self._touch_slot(entry, first_block)
        elif entry.slots and entry.in_slots + taking > entry.slots:
            self._fit_slots(backend, entry, taking, ram_cache, in_use)

    def untracked_prompt(self, backend: str, *, ram_cache: bool = False) -> None:
        """A prompt shorter than one block was served there: its slot holds it now (the prompt it
        overwrote is gone, or with ``ram_cache`` saved there)."""
        entry = self._entry(backend)
        self._add_copy(entry, _UNTRACKED)
        if entry.slots and entry.in_slots > entry.slots:
            self._fit_slots(backend, entry, 0, ram_cache)

    def take_saved(self, backend: str, first_block: bytes) -> bool:
        """A request is sent there that will load the saved copy into its slot; whether there was one."""
        entry = self._backends.get(backend)
        if entry is None or first_block not in entry.saved:
            return False
        entry.saved.discard(first_block)
        return True

    def holders(self, block: bytes) -> set[str]:
        """Backends holding this block (and so the whole prompt up to its end)."""
        return self._holders.get(block, set())

    def insert(
        self,
        backend: str,
        blocks: Sequence[bytes],
        end: tuple[int, bytes] | None = None,
        *,
        new_copy: bool = True,
        ram_cache: bool = False,
    ) -> None:
        """The backend now holds this prompt (it was just served there); ``new_copy``: in a slot
        that did not hold its beginning before (it found no free copy there); ``ram_cache``: the
        backend has one, where the next task that does not reuse the slot saves it."""
        entry = self._entry(backend)
        held = entry.blocks
        if blocks and (new_copy or blocks[0] not in held):
            self._add_copy(entry, blocks[0])
        elif blocks:
            self._touch_slot(entry, blocks[0])
        if blocks and ram_cache:
            entry.idle.add(blocks[0])
        # The hottest loop of a release (a prompt is 4-64 blocks): names bound once.
        move_to_end = held.move_to_end
        all_holders = self._holders
        for block in reversed(blocks):
            if block in held:
                move_to_end(block)
            else:
                held[block] = None
                holders = all_holders.get(block)
                if holders is None:
                    all_holders[block] = {backend}
                else:
                    holders.add(backend)
        if end is not None:
            position, mark = end
            if mark in entry.ends:
                entry.ends.move_to_end(mark)
            else:
                entry.ends[mark] = position
                self._holders.setdefault(mark, set()).add(backend)
        if entry.slots and entry.in_slots > entry.slots:  # (our own tasks made room as they started)
            self._fit_slots(backend, entry, 0, ram_cache)
        self._evict(backend, entry)

    def observe(self, backend: str, expected_blocks: int, actual_blocks: int) -> None:
        """Correct the belief with what a response reported (``timings.cache_n`` in blocks)."""
        entry = self._entry(backend)
        if expected_blocks >= 2 and actual_blocks < expected_blocks // 2:
            entry.limit = max(16.0, entry.ceiling * _FLOOR, entry.limit * _SHRINK)
            self._evict(backend, entry)
        elif actual_blocks >= expected_blocks:
            entry.limit = min(float(entry.ceiling), entry.limit * _GROW)

    def clear(self, backend: str) -> None:
        """The backend restarted: its caches are empty."""
        entry = self._backends.get(backend)
        if entry is None:
            return
        for block in (*entry.blocks, *entry.ends):
            self._drop_holder(block, backend)
        entry.blocks.clear()
        entry.ends.clear()
        entry.copies.clear()
        entry.slot_order.clear()
        entry.in_slots = 0
        entry.saved.clear()
        entry.idle.clear()
        entry.limit = float(entry.ceiling)

    def _evict(self, backend: str, entry: _BackendBlocks) -> None:
        held = entry.blocks
        while len(held) > entry.limit:
            block, _ = held.popitem(last=False)
            entry.in_slots -= entry.copies.pop(block, 0)
            entry.slot_order.pop(block, None)
            entry.saved.discard(block)
            entry.idle.discard(block)
            self._drop_holder(block, backend)
        ends = entry.ends
        while len(ends) > max(16.0, entry.limit * _ENDS_PER_BLOCK):
            mark, _ = ends.popitem(last=False)
            self._drop_holder(mark, backend)

    @staticmethod
    def _touch_slot(entry: _BackendBlocks, first_block: bytes) -> None:
        """A slot holding a prompt with this beginning was just used: it is overwritten last."""
        if first_block in entry.slot_order:
            entry.slot_order.move_to_end(first_block)

    @staticmethod
    def _add_copy(entry: _BackendBlocks, first_block: bytes) -> None:
        entry.copies[first_block] = entry.copies.get(first_block, 0) + 1
        entry.in_slots += 1
        entry.slot_order[first_block] = None
        entry.slot_order.move_to_end(first_block)

    def _fit_slots(
        self, backend: str, entry: _BackendBlocks, taking: int, ram_cache: bool, in_use: InUse | None = None
    ) -> None:
        """Overwrite the least recently used idle slots until the prompts in slots and the ``taking``
        tasks fit in the backend's (known) slots. ``in_use``: how many copies of a prompt beginning
        running tasks use; llama-server never takes a slot that is processing."""
        excess = entry.in_slots + taking - entry.slots
        for first_block in list(entry.slot_order):
            if excess <= 0:
                return
            idle = entry.copies[first_block]
            if in_use is not None and first_block != _UNTRACKED:
                idle -= in_use(first_block)
            for _ in range(min(idle, excess)):
                self._drop_copy(backend, entry, first_block, ram_cache)
                excess -= 1

    def _drop_copy(self, backend: str, entry: _BackendBlocks, first_block: bytes, ram_cache: bool) -> None:
        """One slot holding a prompt with this beginning is overwritten. A prompt left in no slot
        is gone, or saved in the RAM cache."""
        entry.in_slots -= 1
        left = entry.copies[first_block] - 1
        if left:
            entry.copies[first_block] = left
            return
        del entry.copies[first_block]
        del entry.slot_order[first_block]
        if first_block == _UNTRACKED:
            return
        entry.idle.discard(first_block)
        if ram_cache:
            entry.saved.add(first_block)
        elif first_block not in entry.saved and first_block in entry.blocks:
            # Its first block gone, no match reaches the rest; the block bound drops that later.
            del entry.blocks[first_block]
            self._drop_holder(first_block, backend)

    def _drop_holder(self, block: bytes, backend: str) -> None:
        holders = self._holders.get(block)
        if holders is not None:
            holders.discard(backend)
            if not holders:
                del self._holders[block]
