"""A request's canonical prompt, cut into chained-hash blocks, and how many slots it takes.

The canonical prompt is what llama-server puts in a slot's KV cache, in order: for chat the
tools and the messages, for completions the prompt, and so on. It is not the chat template's
rendering, but it is prefix-stable in the same way: a conversation's next turn starts with
exactly the bytes of the turn before. Each block's hash covers everything before it, so two
requests share block ``k`` only if they share the whole prompt up to the end of block ``k``.

Hashing is incremental over the parsed body (nothing is re-serialized but small tool
definitions) and stops after ``max_blocks``: routing needs no more than a backend can hold.
Media (base64 images, audio) hash by a sample of their content, in constant time.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["NO_PROMPT", "PromptShape", "prompt_shape"]

_MESSAGE_END = "\x1e"
_FIELD_END = "\x1f"
_MEDIA_SAMPLE = 2048
MARK_BYTES = 64
"""Granularity of the marks near a prompt's end."""
_MARKED_BLOCKS = 8
"""Full blocks before the end that carry marks: a conversation's next turn usually adds less."""


@dataclass(frozen=True, slots=True)
class PromptShape:
    """What the scheduler needs to know of a request's prompt."""

    blocks: tuple[bytes, ...]
    """Chained hashes of the prompt's full blocks, first block first."""
    chars: int
    """Length of the whole canonical prompt in characters (also past the hashed blocks)."""
    weight: int
    """Slots llama-server runs tasks in for this request (``n``, an array ``prompt``, inputs...)."""
    marks: tuple[tuple[int, bytes], ...] = ()
    """Finer hashes near the end: ``(position in bytes, hash of the prompt up to it)`` every
    ``MARK_BYTES``, at every message's end and at the prompt's end, over the last few blocks and
    the partial block after them, shallowest first.
    A short conversation's turn fits in one or two blocks; its marks tell which backend holds
    the previous turn, which the blocks alone cannot."""
    end: tuple[int, bytes] | None = None
    """The mark at the prompt's very end, when that is past its last full block: what a slot
    holds once it served this prompt (a chat's next turn has a mark there: a message ends there)."""


class _Hasher:
    """Cuts text into fixed-size byte blocks and chains their hashes."""

    __slots__ = ("_block", "_digest", "_ends", "_max_blocks", "_pending", "_recent", "blocks", "chars")

    def __init__(self, seed: str, block_bytes: int, max_blocks: int) -> None:
        self._digest = hashlib.blake2b(seed.encode("utf-8", "surrogatepass"), digest_size=8)
        self._block = block_bytes
        self._max_blocks = max_blocks
        self._pending = bytearray()
        self._recent: deque[tuple[Any, bytes]] = deque(maxlen=_MARKED_BLOCKS)
        """The last full blocks: the chain's state before each, and its bytes."""
        self._ends: deque[int] = deque(maxlen=4 * _MARKED_BLOCKS)
        """Where the last messages ended, in bytes."""
        self.blocks: list[bytes] = []
        self.chars = 0

    def add(self, text: str) -> None:
        self.chars += len(text)
        if len(self.blocks) >= self._max_blocks:
            return
        pending = self._pending
        pending += text.encode("utf-8", "surrogatepass")
        if text == _MESSAGE_END:
            self._ends.append(len(self.blocks) * self._block + len(pending))
        size = self._block
        if len(pending) < size:
            return
        view = memoryview(pending)
        start = 0
        while len(pending) - start >= size and len(self.blocks) < self._max_blocks:
            block = bytes(view[start : start + size])
            self._recent.append((self._digest.copy(), block))
            self._digest.update(block)
            self.blocks.append(self._digest.copy().digest())
            start += size
        view.release()
        del pending[:start]

    def marks(self) -> tuple[tuple[tuple[int, bytes], ...], tuple[int, bytes] | None]:
        """The prompt's marks and its end mark (none past ``max_blocks``: routing never looks there)."""
        if len(self.blocks) >= self._max_blocks:
            return (), None
        size = self._block
        first_block = len(self.blocks) - len(self._recent)
        pieces = [*self._recent, (self._digest, bytes(self._pending))]
        start = first_block * size
        total = len(self.blocks) * size + len(self._pending)
        cuts = {*range(start + MARK_BYTES, total, MARK_BYTES), *(end for end in self._ends if end > start), total}
        found: list[tuple[int, bytes]] = []
        for position in sorted(cuts):
            block, offset = divmod(position, size)
            if offset == 0:
                continue  # a block boundary: the block hash covers it
            state, data = pieces[block - first_block]
            digest = state.copy()
            digest.update(data[:offset])
            found.append((position, digest.digest()))
        end = found[-1] if found and found[-1][0] == total else None
        return tuple(found), end


def media_digest(data: str) -> str:
    """A content hash of a (possibly huge) media string, from a fixed-size sample of it."""
    size = len(data)
    if size <= 3 * _MEDIA_SAMPLE:
        sample = data
    else:
        middle = size // 2
        sample = data[:_MEDIA_SAMPLE] + data[middle : middle + _MEDIA_SAMPLE] + data[-_MEDIA_SAMPLE:]
    digest = hashlib.blake2b(sample.encode("utf-8", "surrogatepass"), digest_size=12)
    digest.update(size.to_bytes(8, "little"))
    return "<media:" + digest.hexdigest() + ">"


NO_PROMPT = PromptShape((), 0, 1)
"""A request that takes one slot and has nothing cacheable."""


def prompt_shape(
    kind: str, payload: dict[str, Any], model: str | None, block_bytes: int, max_blocks: int
) -> PromptShape:
    """The prompt shape of a parsed, already validated request body of the given route kind."""
    hasher = _Hasher((model or "") + "\0", block_bytes, max_blocks)
    weight = 1
    if kind == "chat":
        _add_json(hasher, payload.get("tools"))
        _add_messages(hasher, payload.get("messages"))
        weight = _positive_int(payload.get("n"))
    elif kind == "completion":
        prompt = payload.get("prompt")
        prompts = _prompt_list(prompt)
        weight = max(1, len(prompts)) * _positive_int(payload.get("n"))
        if prompts:
            _add_prompt(hasher, prompts[0])
    elif kind == "infill":
        for chunk in payload.get("input_extra") or ():
            if isinstance(chunk, dict):
                _add_text(hasher, chunk.get("filename"))
                _add_text(hasher, chunk.get("text"))
        for field in ("input_prefix", "input_suffix", "prompt"):
            _add_text(hasher, payload.get(field))
            hasher.add(_FIELD_END)
    elif kind == "messages":
        _add_json(hasher, payload.get("tools"))
        _add_content(hasher, payload.get("system"))
        hasher.add(_MESSAGE_END)
        _add_messages(hasher, payload.get("messages"))
    elif kind == "responses":
        _add_json(hasher, payload.get("tools"))
        _add_text(hasher, payload.get("instructions"))
        hasher.add(_MESSAGE_END)
        items = payload.get("input")
        if isinstance(items, str):
            hasher.add(items)
        else:
            _add_messages(hasher, items)
    elif kind == "embeddings":
        inputs = payload.get("input", payload.get("content"))
        weight = max(1, len(_prompt_list(inputs)))
    elif kind == "rerank":
        documents = payload.get("documents", payload.get("texts"))
        weight = max(1, len(documents)) if isinstance(documents, list) else 1
    marks, end = hasher.marks() if hasher.blocks else ((), None)
    return PromptShape(tuple(hasher.blocks), hasher.chars, weight, marks, end)


def _positive_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1


def _prompt_list(prompt: Any) -> list[Any]:
    """Several prompts, or one: a string or a list of token ids is one prompt."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list, dict)) for p in prompt):
        return prompt
    return [] if prompt is None else [prompt]


def _add_prompt(hasher: _Hasher, prompt: Any) -> None:
    if isinstance(prompt, str):
        hasher.add(prompt)
    elif isinstance(prompt, list):
        # Token ids, possibly mixed with text pieces.
        hasher.add(" ".join(str(piece) for piece in prompt))
    elif isinstance(prompt, dict):
        _add_text(hasher, prompt.get("prompt_string"))


def _add_text(hasher: _Hasher, value: Any) -> None:
    if isinstance(value, str):
        hasher.add(value)


def _add_json(hasher: _Hasher, value: Any) -> None:
    # Tool definitions are small and sit before the messages in every template.
    if value:
        hasher.add(json.dumps(value, sort_keys=True, ensure_ascii=False))
        hasher.add(_FIELD_END)


def _add_messages(hasher: _Hasher, messages: Any) -> None:
    if not isinstance(messages, list):
        return
    for message in messages:
        if not isinstance(message, dict):
            continue
        _add_text(hasher, message.get("role") or message.get("type"))
        hasher.add(_FIELD_END)
        _add_content(hasher, message.get("content"))
        for field in ("tool_calls", "function_call", "arguments", "output", "name", "call_id"):
            value = message.get(field)
            if value is not None:
                hasher.add(value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False))
        hasher.add(_MESSAGE_END)


def _add_content(hasher: _Hasher, content: Any) -> None:
    if isinstance(content, str):
        hasher.add(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                _add_part(hasher, part)
            elif isinstance(part, str):
                hasher.add(part)


def _add_part(hasher: _Hasher, part: dict[str, Any]) -> None:
    text = part.get("text")
    if isinstance(text, str):
        hasher.add(text)
        return
    for media in _media_strings(part):
        hasher.add(media_digest(media))
    for field in ("input", "content"):  # /v1/messages tool_use and tool_result
        value = part.get(field)
        if isinstance(value, str):
            hasher.add(value)
        elif isinstance(value, list):
            _add_content(hasher, value)
        elif isinstance(value, dict):
            hasher.add(json.dumps(value, sort_keys=True, ensure_ascii=False))


def _media_strings(part: dict[str, Any]) -> Iterable[str]:
    """The media payloads of an OpenAI, Anthropic or Responses content part."""
    for field in ("image_url", "input_audio", "source", "file", "image"):
        value = part.get(field)
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for key in ("url", "data", "file_data"):
                inner = value.get(key)
                if isinstance(inner, str):
                    yield inner
