from __future__ import annotations

import time
from collections import OrderedDict

__all__ = ["AffinityTable"]


class AffinityTable:
    """Conversation key -> the backend that last served it, with a TTL and a size bound (LRU)."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float | None = None) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        backend, stored_at = entry
        if (now if now is not None else time.monotonic()) - stored_at > self._ttl_s:
            del self._entries[key]
            return None
        return backend

    def set(self, key: str, backend: str, now: float | None = None) -> None:
        self._entries[key] = (backend, now if now is not None else time.monotonic())
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def forget_backend(self, backend: str) -> None:
        for key in [k for k, (name, _) in self._entries.items() if name == backend]:
            del self._entries[key]
