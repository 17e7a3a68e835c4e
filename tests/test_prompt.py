"""The prompt's chained block hashes: what the prefix index matches on."""

from __future__ import annotations

from typing import Any

from llamacpp_ha._prompt import PromptShape, media_digest, prompt_shape

BLOCK = 64


def shape(kind: str, body: dict[str, Any], model: str | None = "m", max_blocks: int = 1024) -> PromptShape:
    return prompt_shape(kind, body, model, BLOCK, max_blocks)


def chat(*contents: str, system: str = "You are terse.") -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for i, content in enumerate(contents):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
    return {"messages": messages}


def shared_blocks(a: PromptShape, b: PromptShape) -> int:
    n = 0
    for x, y in zip(a.blocks, b.blocks, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_blocks_are_fixed_size_and_only_full_ones_count() -> None:
    short = shape("completion", {"prompt": "x" * (BLOCK - 1)})
    assert short.blocks == ()
    assert short.chars == BLOCK - 1
    exact = shape("completion", {"prompt": "x" * (3 * BLOCK + 10)})
    assert len(exact.blocks) == 3


def test_a_blocks_hash_covers_everything_before_it() -> None:
    # The same second block of text after different first blocks hashes differently.
    one = shape("completion", {"prompt": "a" * BLOCK + "z" * BLOCK})
    other = shape("completion", {"prompt": "b" * BLOCK + "z" * BLOCK})
    assert one.blocks[1] != other.blocks[1]


def test_a_growing_conversation_keeps_its_earlier_blocks() -> None:
    turn1 = shape("chat", chat("plan a trip to Rome " * 20))
    turn2 = shape("chat", chat("plan a trip to Rome " * 20, "Where to first? " * 10, "the Forum " * 30))
    assert len(turn2.blocks) > len(turn1.blocks)
    assert shared_blocks(turn1, turn2) == len(turn1.blocks)


def test_a_long_shared_system_prompt_is_shared_and_conversations_then_differ() -> None:
    system = "Policy text. " * 400  # far longer than 4,096 characters
    one = shape("chat", chat("first question " * 10, system=system))
    other = shape("chat", chat("second question " * 10, system=system))
    common = shared_blocks(one, other)
    assert common >= len(system) // BLOCK - 1
    assert one.blocks[-1] != other.blocks[-1]


def test_the_model_is_part_of_every_hash() -> None:
    body = {"prompt": "x" * 4 * BLOCK}
    assert shared_blocks(shape("completion", body, "m1"), shape("completion", body, "m2")) == 0


def test_hashing_stops_at_max_blocks_but_counts_every_character() -> None:
    capped = shape("completion", {"prompt": "y" * 100 * BLOCK}, max_blocks=5)
    assert len(capped.blocks) == 5
    assert capped.chars == 100 * BLOCK


def test_media_hashes_by_content_without_reading_all_of_it() -> None:
    image = "data:image/png;base64," + "A" * 4_000_000
    other = "data:image/png;base64," + "A" * 2_000_000 + "B" + "A" * 1_999_999
    assert media_digest(image) == media_digest(image)
    assert media_digest(image) != media_digest(other)  # the middle sample differs
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this? " * 10},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ]
    }
    with_image = shape("chat", body)
    assert with_image.chars < 1000  # the 4 MB image counts as its digest
    assert with_image.blocks


def test_anthropic_messages_responses_and_infill_have_prompts() -> None:
    system = "You review code. " * 20
    messages = shape("messages", {"system": system, "messages": [{"role": "user", "content": "look " * 40}]})
    responses = shape("responses", {"instructions": system, "input": "look " * 40})
    infill = shape("infill", {"input_prefix": "def f(x):\n" * 20, "input_suffix": "return x\n"})
    for prompt in (messages, responses, infill):
        assert len(prompt.blocks) >= 2


def test_weights_count_the_tasks_llama_server_runs() -> None:
    assert shape("chat", chat("hi") | {"n": 3}).weight == 3
    assert shape("completion", {"prompt": ["a", "b", "c"]}).weight == 3
    assert shape("completion", {"prompt": [1, 2, 3]}).weight == 1  # token ids: one prompt
    assert shape("embeddings", {"input": ["a", "b"]}).weight == 2
    assert shape("rerank", {"query": "q", "documents": ["a", "b", "c", "d"]}).weight == 4
    assert shape("chat", chat("hi")).weight == 1


def test_a_turn_ending_inside_a_block_is_found_by_its_end_mark() -> None:
    # Blocks of 512 bytes: a short conversation's own text sits in the partial block after the
    # shared system prompt, where no block hash covers it. Its end mark does.
    system = "Rules. " * 100
    first = prompt_shape("chat", chat("plan a trip to Rome", system=system), "m", 512, 64)
    later = prompt_shape(
        "chat", chat("plan a trip to Rome", "Start at the Forum.", "day 2?", system=system), "m", 512, 64
    )
    other = prompt_shape(
        "chat", chat("plan a trip to Oslo", "Start at the fjord.", "day 2?", system=system), "m", 512, 64
    )
    assert first.blocks == later.blocks[: len(first.blocks)] == other.blocks[: len(first.blocks)]
    assert first.end is not None
    assert first.end[0] > len(first.blocks) * 512
    assert first.end in later.marks
    assert first.end not in other.marks
    positions = [position for position, _ in later.marks]
    assert positions == sorted(positions)
    assert later.end == later.marks[-1]


def test_a_prompt_past_max_blocks_has_no_marks() -> None:
    capped = prompt_shape("completion", {"prompt": "y" * 10_000}, "m", 512, 4)
    assert len(capped.blocks) == 4
    assert capped.marks == ()
    assert capped.end is None
