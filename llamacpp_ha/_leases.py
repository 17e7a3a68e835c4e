from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

from ._backend import Backend

__all__ = ["Lease", "LeasePhase", "Timings"]

_TIMINGS = re.compile(rb'"(cache_n|prompt_n|prompt_ms|predicted_n)"\s*:\s*([0-9.eE+-]+)')


@dataclass(frozen=True, slots=True)
class Timings:
    """What llama-server reported of one response's prompt processing (``timings``)."""

    cache_n: int
    prompt_n: int
    prompt_ms: float
    predicted_n: int = 0
    """Tokens generated."""

    @staticmethod
    def find(tail: bytes) -> Timings | None:
        """The last ``timings`` in the tail of a response body, if it carries one."""
        start = tail.rfind(b'"timings"')
        if start < 0:
            return None
        found: dict[bytes, float] = {}
        for name, value in _TIMINGS.findall(tail, start):
            try:
                found[name] = float(value)
            except ValueError:
                return None
        if b"cache_n" not in found or b"prompt_n" not in found:
            return None
        return Timings(
            int(found[b"cache_n"]),
            int(found[b"prompt_n"]),
            found.get(b"prompt_ms", 0.0),
            int(found.get(b"predicted_n", 0)),
        )


class LeasePhase(StrEnum):
    """Where a granted request is; only ``DELIVERED`` runs the idle clock.

    ``SENDING -> READING`` when the answer's headers are handed over and the consumer reads the
    body; ``READING <-> DELIVERED`` as each piece is given to the consumer and it asks for the
    next; any phase ``-> DONE`` once, at :meth:`Lease.release`.
    """

    SENDING = "sending"
    """Sent to the backend, no answer yet: the backend's turn, however long it generates."""
    READING = "reading"
    """The consumer waits for the backend's next bytes: the backend's turn."""
    DELIVERED = "delivered"
    """The consumer has what arrived and has not asked for more: its turn, the idle clock runs."""
    DONE = "done"
    """Released: its slots are free again."""


class Lease:
    """Slots on one backend, held from dispatch until the response body is finished.

    Owns the request's phase after it left the queue (:class:`LeasePhase`), its idle clock and
    the closer of its response. :meth:`release` gives the slots back exactly once, synchronously:
    the scheduler sees them free before the caller's next await, so no request waits beside an
    idle slot.
    """

    __slots__ = (
        "_on_release",
        "acquired_at",
        "affinity",
        "backend",
        "blocks",
        "closer",
        "end",
        "expected_cached_tokens",
        "first_byte_at",
        "last_activity",
        "loads_model",
        "new_copy",
        "on_first_byte",
        "phase",
        "predicted_prefill_s",
        "prompt_chars",
        "prompt_tokens",
        "refused",
        "shared_member",
        "timings",
        "uncached_tokens",
        "weight",
    )

    def __init__(self, backend: Backend, on_release: Callable[[Lease], None], weight: int = 1) -> None:
        self.backend = backend
        self._on_release = on_release
        self.weight = weight
        """Slots this lease holds (llama-server runs ``n`` choices or several inputs as several tasks)."""
        self.phase = LeasePhase.SENDING
        self.acquired_at = time.monotonic()
        self.last_activity = self.acquired_at
        """When the consumer last got something (the idle clock runs from here while ``DELIVERED``)."""
        self.first_byte_at: float | None = None
        self.affinity: str | None = None
        """``hit``, ``miss`` or ``new``: whether the backend was the one holding most of the prompt."""
        self.closer: Callable[[], Awaitable[None]] | None = None
        """Closes the response this lease serves; called when the consumer abandons it."""
        self.blocks: tuple[bytes, ...] = ()
        """The prompt's block hashes: its slot holds them once the response is finished."""
        self.end: tuple[int, bytes] | None = None
        """The prompt's end mark (see ``PromptShape.end``)."""
        self.new_copy = True
        """It found no free slot holding its prompt's beginning there: it fills another slot."""
        self.shared_member: str | None = None
        """Its id in Redis while shared mode admitted it (see ``SharedFleet``)."""
        self.refused = False
        """Shared mode refused it before anything was sent: nothing to learn from it."""
        self.prompt_chars = 0
        self.prompt_tokens = 0.0
        """Estimated prompt tokens."""
        self.expected_cached_tokens = 0.0
        self.uncached_tokens = 0.0
        self.predicted_prefill_s = 0.0
        """Predicted time from dispatch to the first token."""
        self.timings: Timings | None = None
        """What the backend reported, once the response finished."""
        self.loads_model = False
        """Sent to a router's model that was not loaded: the router loads it before answering."""
        self.on_first_byte: Callable[[], None] | None = None
        """Called once when the first body bytes arrive: the prompt is processed."""

    @property
    def released(self) -> bool:
        return self.phase is LeasePhase.DONE

    def answered(self, closer: Callable[[], Awaitable[None]]) -> None:
        """The backend's answer (headers) is handed to the consumer, with what closes it."""
        if self.phase is LeasePhase.SENDING:
            self.closer = closer
            self.delivered()

    def reading(self) -> None:
        """The consumer asks for the next bytes: the backend's turn, not idle however slow."""
        if self.phase is LeasePhase.DELIVERED:
            self.phase = LeasePhase.READING

    def delivered(self) -> None:
        """The consumer has everything that arrived: its turn, and the idle clock starts."""
        if self.phase in (LeasePhase.SENDING, LeasePhase.READING):
            self.phase = LeasePhase.DELIVERED
            self.last_activity = time.monotonic()

    def touch(self) -> None:
        """Body bytes arrived from the backend (the first ones: its prompt is processed)."""
        now = time.monotonic()
        self.last_activity = now
        if self.first_byte_at is None:
            self.first_byte_at = now
            if self.on_first_byte is not None:
                self.on_first_byte()

    def idle_for(self, now: float) -> float:
        """How long the consumer has left it unread (0 unless ``DELIVERED``)."""
        return now - self.last_activity if self.phase is LeasePhase.DELIVERED else 0.0

    @property
    def prefill_deadline(self) -> float:
        """When its prompt is surely processed: a non-streamed answer shows no first byte before the
        end, and a backend may hang, so the prediction counts, with slack."""
        return self.acquired_at + 2 * self.predicted_prefill_s + 0.05

    def prefilling(self, now: float) -> bool:
        """Whether this request's prompt is still being processed, as far as we can tell."""
        return self.first_byte_at is None and now < self.prefill_deadline

    def release(self) -> None:
        if self.phase is LeasePhase.DONE:
            return
        self.phase = LeasePhase.DONE
        self._on_release(self)
