from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PROFILES", "SimConfig"]


class SimConfig(BaseModel):
    """How a simulated llama-server behaves. The defaults imitate fixture server A (tiny model, CPU)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    model: str = "tiny-random-llama.gguf"
    """The model file name; ``/v1/models`` reports the first alias instead when aliases are given."""
    aliases: tuple[str, ...] = ()
    slots: int = Field(default=2, ge=1)
    n_ctx: int = Field(default=1024, ge=16)
    """Context per slot, in the simulator's tokens."""
    prefill_tokens_per_s: float = Field(default=20_000.0, gt=0)
    decode_tokens_per_s: float = Field(default=1_200.0, gt=0)
    """Decode speed of one stream alone; ``inf`` answers instantly."""
    decode_concurrency_exponent: float = Field(default=0.45, ge=0)
    """Per-stream decode speed is ``decode_tokens_per_s * busy_slots ** -exponent``.

    0.45 fits the calibration on llama-server: 51 tok/s alone, 37.5 each with two streams."""
    prefill_slows_decode: float = Field(default=2.0, ge=1)
    """Decoding streams run this many times slower while a slot prefills (calibration: 51 -> 25 tok/s)."""
    decode_token_ms_while_prefilling: float | None = None
    """With it, a decoding stream gets at most one token per this many ms while a slot prefills
    (llama-server interleaves a prompt chunk with every decode step), instead of the
    ``prefill_slows_decode`` factor. GPU calibration: 90-150 ms during a 16k-token prefill."""
    prefill_curve_ms: tuple[float, float, float] | None = None
    """``(t0, a, b)``: prefilling ``n`` new tokens after ``c`` cached ones takes
    ``t0 + a*n + b*((c+n)**2 - c**2)`` ms alone (the GPU calibration's ``t0 + a n + b n^2``, with
    attention to the cached prefix counted). None: ``n / prefill_tokens_per_s``."""
    default_max_tokens: int = Field(default=16, ge=1)
    """Tokens generated when a request sets no limit (a random model would stop at a random EOS)."""
    loading_s: float = Field(default=0.0, ge=0)
    """Every path answers 503 ``Loading model`` for this long after start."""
    api_key: str | None = None
    slots_endpoint: bool = True
    metrics: bool = True
    cache_ram_mib: int = Field(default=8192, ge=0)
    """Server-wide RAM prompt cache shared by all slots, in MiB, as llama-server's ``--cache-ram``
    (default 8192; 0 turns it off). A slot's prompt is saved there before another prompt
    overwrites most of it, and a better saved prompt is moved from there into the slot; the
    oldest saved prompts go when the total passes the limit."""
    cache_idle_slots: bool = True
    """Save every idle slot's prompt to the RAM cache each time a task starts, as llama-server's
    ``--cache-idle-slots`` (default on; needs the RAM cache)."""
    kv_bytes_per_token: int = Field(default=49_152, ge=1)
    """KV cache bytes per token, to size saved prompts (200M model: 12 layers x 1024 x 2 x f16)."""
    slot_prompt_similarity: float = Field(default=0.10, ge=0, le=1)
    disconnect_check_s: float = Field(default=1.0, ge=0)
    """How late a non-streaming request notices its client left (llama-server polls once a second)."""
    build_info: str = "b11312-0c1e570"
    close_after_stream: bool = True
    """Close the TCP connection after each streamed response, as llama-server does (its headers
    say keep-alive all the same)."""

    @classmethod
    def profile(cls, name: str, **overrides: Any) -> SimConfig:
        """A named calibration from ``shared/calibration.md``: ``cpu-200m`` or ``gpu-8b``."""
        return cls.model_validate(PROFILES[name] | overrides)

    @property
    def model_id(self) -> str:
        return self.aliases[0] if self.aliases else self.model

    @property
    def instant(self) -> bool:
        return math.isinf(self.decode_tokens_per_s) and math.isinf(self.prefill_tokens_per_s)


PROFILES: dict[str, dict[str, Any]] = {
    # llama-server -np 2 -t 2 on 2 CPU cores, 200M-parameter model, f16.
    "cpu-200m": {
        "model": "big-random-llama.gguf",
        "prefill_tokens_per_s": 360.0,
        "decode_tokens_per_s": 51.0,
        "decode_concurrency_exponent": 0.45,
        "prefill_slows_decode": 2.0,
        "kv_bytes_per_token": 49_152,
    },
    # llama-server -ngl 99 -fa on on one H200, Llama-3 8B shape, f16. Decode falls from 185
    # tokens/s alone to 800-900 in total over 16 streams (exponent 0.45 fits 2-16 streams within
    # 20%); running streams get a token every 90-150 ms while a prompt prefills.
    "gpu-8b": {
        "model": "llama-3-8b-random.gguf",
        "prefill_tokens_per_s": 24_000.0,
        "prefill_curve_ms": (3.0, 0.041, 7.8e-7),
        "decode_tokens_per_s": 185.0,
        "decode_concurrency_exponent": 0.45,
        "decode_token_ms_while_prefilling": 120.0,
        "kv_bytes_per_token": 131_072,
    },
}
"""Calibrated speeds; ``prefill_tokens_per_s`` of the GPU profile only matters without the curve."""
