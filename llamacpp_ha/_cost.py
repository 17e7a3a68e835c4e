"""What a request costs on a backend: learned rates and the predicted time to its first token.

Rates are moving averages of what responses report: a backend's prefill rate from
``timings.prompt_n / prompt_ms``, a model's tokens per character of canonical prompt from
``cache_n + prompt_n``, and how long a backend's slots stay taken. Until a backend has reported
anything it is assumed as fast as the fleet's average, so a new backend is neither avoided
nor flooded.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._backend import Backend, BackendState

__all__ = ["CostModel"]

_ALPHA = 0.2
_MIN_PROMPT_N = 32
"""Prefills shorter than this measure overhead, not rate."""
DEFAULT_PREFILL_TOKENS_PER_S = 2000.0
DEFAULT_TOKENS_PER_CHAR = 0.25
DEFAULT_SERVICE_S = 5.0
DEFAULT_LOAD_S = 10.0
"""How long a router is assumed to take to load a model, until one load was seen."""


def _ema(old: float | None, new: float) -> float:
    return new if old is None else old + _ALPHA * (new - old)


class CostModel:
    def __init__(self, backends: Sequence[Backend]) -> None:
        self._backends = backends
        self._tokens_per_char: dict[str | None, float] = {}
        self._rates_sum = sum(b.prefill_rate for b in backends if b.prefill_rate is not None)
        self._rates_count = sum(1 for b in backends if b.prefill_rate is not None)
        """Kept as rates are learned: a backend that has not reported one is priced at the fleet's
        mean, and a decision must not scan the fleet for it."""
        self.mean_prompt_tokens: float | None = None
        """Moving average of prompt lengths: a slot holds one prompt, whatever its context size."""

    def tokens_per_char(self, model: str | None) -> float:
        ratio = self._tokens_per_char.get(model)
        if ratio is None:
            ratio = self._tokens_per_char.get(None, DEFAULT_TOKENS_PER_CHAR)
        return ratio

    def learned_tokens_per_char(self, model: str | None) -> bool:
        """Whether responses taught us the ratio (for this model, or any)."""
        return model in self._tokens_per_char or None in self._tokens_per_char

    def prefill_rate(self, backend: Backend) -> float:
        if backend.prefill_rate is not None:
            return backend.prefill_rate
        return self._rates_sum / self._rates_count if self._rates_count else DEFAULT_PREFILL_TOKENS_PER_S

    def service_s(self, backend: Backend) -> float:
        return backend.service_s if backend.service_s is not None else DEFAULT_SERVICE_S

    def slot_wait_s(self, backend: Backend, ahead: int) -> float:
        """Expected wait for a slot on a full backend, with ``ahead`` requests already waiting for it."""
        return (ahead + 1) * self.service_s(backend) / max(1, backend.capacity)

    def prefill_s(self, backend: Backend, uncached_tokens: float, now: float, *, pending: float | None = None) -> float:
        """Time to process ``uncached_tokens`` behind the prefills already running there
        (``pending`` tokens, when the caller knows them), after loading the model on a router
        that has it unloaded."""
        loading = self.load_s(backend) if backend.state is BackendState.UNLOADED else 0.0
        if pending is None:
            pending = backend.pending_prefill(now)
        return loading + (pending + uncached_tokens) / self.prefill_rate(backend)

    def load_s(self, backend: Backend) -> float:
        """Time a router takes to load this model: learned there, or on another router, or a default."""
        if backend.load_s is not None:
            return backend.load_s
        known = [b.load_s for b in self._backends if b.load_s is not None and b.router_model == backend.router_model]
        return sum(known) / len(known) if known else DEFAULT_LOAD_S

    def learn_prompt(self, model: str | None, chars: int, tokens: int) -> None:
        if tokens > 0:
            self.mean_prompt_tokens = _ema(self.mean_prompt_tokens, float(tokens))
        if chars >= 64 and tokens > 0:
            ratio = tokens / chars
            self._tokens_per_char[model] = _ema(self._tokens_per_char.get(model), ratio)
            self._tokens_per_char[None] = _ema(self._tokens_per_char.get(None), ratio)

    def learn_prefill(self, backend: Backend, prompt_n: int, prompt_ms: float) -> None:
        if prompt_n >= _MIN_PROMPT_N and prompt_ms > 0:
            old = backend.prefill_rate
            backend.prefill_rate = _ema(old, prompt_n / (prompt_ms / 1000))
            if old is None:
                self._rates_count += 1
                self._rates_sum += backend.prefill_rate
            else:
                self._rates_sum += backend.prefill_rate - old

    @staticmethod
    def learn_load(backend: Backend, load_s: float) -> None:
        backend.load_s = _ema(backend.load_s, load_s)

    @staticmethod
    def learn_service(backend: Backend, held_s: float) -> None:
        backend.service_s = _ema(backend.service_s, held_s)
