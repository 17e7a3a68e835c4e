from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ._backend import Backend
from ._config import PolicyName

__all__ = ["AffinityFirst", "LeastBusy", "Policy", "RoundRobin", "make_policy"]


class Policy(Protocol):
    """Chooses one backend among those that have a free slot and serve the model."""

    def choose(self, candidates: Sequence[Backend], preferred: str | None) -> Backend: ...


class RoundRobin:
    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[Backend], preferred: str | None) -> Backend:
        self._turn += 1
        return candidates[self._turn % len(candidates)]


class LeastBusy:
    """The backend with the smallest busy fraction; ties rotate so equal backends share work."""

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[Backend], preferred: str | None) -> Backend:
        self._turn += 1
        n = len(candidates)
        start = self._turn % n
        best = candidates[start]
        for i in range(1, n):
            backend = candidates[(start + i) % n]
            if backend.load < best.load:
                best = backend
        return best


class AffinityFirst:
    """The conversation's own backend when it has a free slot, else the least busy one.

    Going elsewhere when the preferred backend is full trades a prompt-cache hit for not
    waiting: a shared system prompt must not turn one backend into a hot spot.
    """

    def __init__(self) -> None:
        self._fallback = LeastBusy()

    def choose(self, candidates: Sequence[Backend], preferred: str | None) -> Backend:
        if preferred is not None:
            for backend in candidates:
                if backend.name == preferred:
                    return backend
        return self._fallback.choose(candidates, None)


def make_policy(name: PolicyName) -> Policy:
    policies: dict[str, type[Policy]] = {
        "affinity": AffinityFirst,
        "least_busy": LeastBusy,
        "round_robin": RoundRobin,
    }
    return policies[name]()
