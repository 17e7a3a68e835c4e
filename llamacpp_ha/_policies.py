from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ._backend import Backend
from ._config import PolicyName

__all__ = ["LeastBusy", "Policy", "RoundRobin", "make_policy"]


class Policy(Protocol):
    """Chooses one backend among those that have a free slot and serve the model."""

    def choose(self, candidates: Sequence[Backend]) -> Backend: ...


class RoundRobin:
    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[Backend]) -> Backend:
        self._turn += 1
        return candidates[self._turn % len(candidates)]


class LeastBusy:
    """The backend with the smallest busy fraction; ties rotate so equal backends share work."""

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[Backend]) -> Backend:
        self._turn += 1
        n = len(candidates)
        start = self._turn % n
        best = candidates[start]
        for i in range(1, n):
            backend = candidates[(start + i) % n]
            if backend.load < best.load:
                best = backend
        return best


def make_policy(name: PolicyName) -> Policy:
    policies: dict[str, type[Policy]] = {
        # The cost-aware scheduler decides itself under "affinity"; this is never consulted then.
        "affinity": LeastBusy,
        "least_busy": LeastBusy,
        "round_robin": RoundRobin,
    }
    return policies[name]()
