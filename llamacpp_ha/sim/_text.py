from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["common_prefix_length", "generated_pieces", "render_chat", "tokenize"]

_TOKEN = re.compile(r"\w+|[^\w\s]")
# Random-weight models emit random vocabulary; the shape of the text is all that matters.
_VOCABULARY = (
    " alpha",
    " bread",
    " castle",
    " delta",
    " echo",
    " forest",
    " galaxy",
    " hotel",
    " island",
    " juliet",
    " kilo",
    " lima",
    " meteor",
    " november",
    " ocean",
    " quebec",
    " river",
    " snow",
    " tango",
    " valley",
    "де",
    " fiddle",
    " Amb",
    "RESS",
    " ob",
    " уз",
    " (=",
    "Since",
    " way",
    " mån",
    "ள",
    "atur",
    ",",
    ".",
)


def tokenize(text: str) -> list[str]:
    """Split text into the simulator's tokens: words and punctuation marks."""
    return _TOKEN.findall(text)


def render_chat(messages: Sequence[dict[str, Any]]) -> str:
    """Render messages with the ChatML template the fixture servers report in ``/props``."""
    parts = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str):
            content = "".join(part.get("text", "") for part in content or () if isinstance(part, dict))
        parts.append(f"<|im_start|>{message.get('role', 'user')}\n{content}<|im_end|>\n")
    return "".join(parts) + "<|im_start|>assistant\n"


def generated_pieces(seed: int | None, count: int) -> list[str]:
    """The text pieces of ``count`` generated tokens; the same seed gives the same text."""
    rng = random.Random(seed)
    return [rng.choice(_VOCABULARY) for _ in range(count)]


_CHUNK = 256


def common_prefix_length(a: Sequence[str], b: Sequence[str]) -> int:
    # Whole chunks compare as slices (in C); only the chunk that differs is walked token by token.
    n = min(len(a), len(b))
    i = 0
    while i + _CHUNK <= n and a[i : i + _CHUNK] == b[i : i + _CHUNK]:
        i += _CHUNK
    while i < n and a[i] == b[i]:
        i += 1
    return i
