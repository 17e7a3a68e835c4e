"""A request trace that looks like real use: tenants with long system prompts, multi-turn sessions, one-shots.

The trace is fixed by a seed, so every strategy sees exactly the same requests at the same times.
Times are in unscaled seconds (as on a real fleet); the runner divides them by its speed-up.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from llamacpp_ha.sim._text import render_chat, tokenize

__all__ = ["CALIBRATION", "DECODE_CONCURRENCY_EXPONENT", "Session", "Trace", "calibration_with", "make_trace", "words"]

# llama-server on 2 CPU cores, 200M-parameter model (shared/calibration.md).
CALIBRATION = {"prefill_tokens_per_s": 360.0, "decode_tokens_per_s": 51.0, "prefill_slows_decode": 2.0}
DECODE_CONCURRENCY_EXPONENT = 0.45
"""Streams decoding at once on one backend each run at ``n ** -0.45`` of one alone (as the simulator)."""


def calibration_with(prefill_tokens_per_s: float, decode_tokens_per_s: float) -> dict[str, float]:
    """The calibration with other backends' rates in place (measured, see ``bench.speed``)."""
    return {**CALIBRATION, "prefill_tokens_per_s": prefill_tokens_per_s, "decode_tokens_per_s": decode_tokens_per_s}


_WORDS = [
    "itinerary",
    "museum",
    "harbour",
    "sunrise",
    "market",
    "cathedral",
    "espresso",
    "ferry",
    "vineyard",
    "gallery",
    "piazza",
    "trattoria",
    "mountain",
    "lagoon",
    "festival",
    "orchard",
    "bakery",
    "lantern",
    "promenade",
    "fountain",
    "bridge",
    "theatre",
    "island",
    "garden",
]


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(count))


@dataclass
class Session:
    """One conversation: its turns are sent one after the other, with think time between them."""

    start_s: float
    tenant: int
    system: str
    user_messages: list[str]
    replies: list[str]
    """What the client appends as the assistant's answer before the next turn (fixed, so runs compare)."""
    think_s: list[float]
    max_tokens: int

    def messages(self, turn: int) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}]
        for i in range(turn + 1):
            messages.append({"role": "user", "content": self.user_messages[i]})
            if i < turn:
                messages.append({"role": "assistant", "content": self.replies[i]})
        return messages


@dataclass
class Trace:
    sessions: list[Session]
    requests_per_s: float
    capacity_per_s: float
    """Requests/s the fleet serves if every prompt is processed cold (the unit of offered load)."""
    oracle_cached_tokens: int = 0
    total_prompt_tokens: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(len(session.user_messages) for session in self.sessions)


def _prompt_tokens(messages: list[dict[str, Any]]) -> list[str]:
    return tokenize(render_chat(messages))


def make_trace(
    *,
    load: float,
    duration_s: float,
    backends: int,
    slots: int,
    seed: int = 7,
    tenants: int = 3,
    system_words: int = 400,
    user_words: int = 30,
    reply_words: int = 40,
    max_tokens: int = 40,
    one_shot_share: float = 0.3,
    think_mean_s: float = 4.0,
    speed: Mapping[str, float] = CALIBRATION,
) -> Trace:
    """Sessions arriving as a Poisson process at ``load`` times the fleet's capacity.

    Capacity is what the fleet serves when each prompt is processed only past the prefix an ideal
    router finds in cache (the oracle below): the same unit for every strategy. The capacity with
    every prompt processed cold is reported beside it. ``speed``: the backends' rates, as in
    :data:`CALIBRATION` (real backends: measured, see ``bench.speed``).
    """
    rng = random.Random(seed)
    systems = [f"Tenant {t} policy. " + words(rng, system_words) for t in range(tenants)]

    def new_session(index: int) -> Session:
        turns = 1 if rng.random() < one_shot_share else rng.randint(2, 5)
        tenant = rng.randrange(tenants)
        return Session(
            start_s=0.0,
            tenant=tenant,
            system=systems[tenant],
            user_messages=[f"Session {index}, question {i}: " + words(rng, user_words) for i in range(turns)],
            replies=[words(rng, reply_words) for _ in range(turns)],
            think_s=[rng.expovariate(1 / think_mean_s) for _ in range(turns)],
            max_tokens=max_tokens,
        )

    def service_s(prompt_tokens: int) -> float:
        # One request's time on its backend: the prefill rate is shared by the backend's slots,
        # decoding runs slots-wide at the calibrated per-stream speed.
        decode_rate = slots * speed["decode_tokens_per_s"] / math.pow(slots, DECODE_CONCURRENCY_EXPONENT)
        return prompt_tokens / speed["prefill_tokens_per_s"] + max_tokens / decode_rate

    sample = [new_session(i) for i in range(300)]
    lengths = list(_oracle(sample))
    capacity = backends * len(lengths) / sum(service_s(total - reusable) for total, reusable in lengths)
    cold_capacity = backends * len(lengths) / sum(service_s(total) for total, _ in lengths)
    session_rate = load * capacity * len(sample) / len(lengths)

    sessions: list[Session] = []
    clock = rng.expovariate(session_rate)
    while clock < duration_s:
        session = sample[len(sessions)] if len(sessions) < len(sample) else new_session(len(sessions))
        session.start_s = clock
        sessions.append(session)
        clock += rng.expovariate(session_rate)

    trace = Trace(sessions, requests_per_s=load * capacity, capacity_per_s=capacity)
    trace.notes["cold_capacity_per_s"] = cold_capacity
    for total, reusable in _oracle(sessions):
        trace.total_prompt_tokens += total
        trace.oracle_cached_tokens += reusable
    return trace


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _oracle(sessions: list[Session]) -> Iterator[tuple[int, int]]:
    """Per request: its prompt tokens, and those an oracle could serve from cache.

    The reusable prefix is the previous turn's prompt, or the tenant's system prompt once the
    tenant has been seen. The oracle always picks the backend that holds it and never loses a
    cache entry, so it bounds what any real strategy gets.
    """
    seen_tenant: set[int] = set()
    for session in sessions:
        previous: list[str] | None = None
        system_only = _prompt_tokens([{"role": "system", "content": session.system}])
        for turn in range(len(session.user_messages)):
            prompt = _prompt_tokens(session.messages(turn))
            reusable = _common_prefix(previous, prompt) if previous is not None else 0
            if session.tenant in seen_tenant:
                reusable = max(reusable, _common_prefix(system_only, prompt))
            yield len(prompt), min(reusable, len(prompt) - 1)
            previous = prompt
        seen_tenant.add(session.tenant)
