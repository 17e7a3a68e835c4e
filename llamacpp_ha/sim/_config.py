from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SimConfig"]


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
    default_max_tokens: int = Field(default=16, ge=1)
    """Tokens generated when a request sets no limit (a random model would stop at a random EOS)."""
    loading_s: float = Field(default=0.0, ge=0)
    """Every path answers 503 ``Loading model`` for this long after start."""
    api_key: str | None = None
    slots_endpoint: bool = True
    metrics: bool = True
    cache_ram: bool = True
    """Keep a server-wide prompt cache shared by all slots, as llama-server's ``--cache-ram`` does."""
    slot_prompt_similarity: float = Field(default=0.10, ge=0, le=1)
    disconnect_check_s: float = Field(default=1.0, ge=0)
    """How late a non-streaming request notices its client left (llama-server polls once a second)."""
    build_info: str = "b11312-0c1e570"

    @property
    def model_id(self) -> str:
        return self.aliases[0] if self.aliases else self.model

    @property
    def instant(self) -> bool:
        return math.isinf(self.decode_tokens_per_s) and math.isinf(self.prefill_tokens_per_s)
