from __future__ import annotations

import json

import pytest

from llamacpp_ha import BadRequestError
from llamacpp_ha._request import RequestFacts, parse_request


def no_headers(name: str) -> str | None:
    return None


def parse(path: str, body: object, headers: dict[str, str] | None = None) -> RequestFacts:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(path, (headers or {}).get, raw, prefix_chars=4096)


def chat_body(text: str, system: str = "sys", **extra: object) -> dict[str, object]:
    return {
        "model": "m",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}],
        **extra,
    }


def test_reads_model_and_stream() -> None:
    facts = parse("/v1/chat/completions", chat_body("hi", stream=True))
    assert facts.model == "m"
    assert facts.stream is True


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/chat/completions", b"{not json", "not valid JSON"),
        ("/v1/chat/completions", b"", "must be a JSON object"),
        ("/v1/chat/completions", [1, 2], "must be a JSON object"),
        ("/v1/chat/completions", {"model": "m"}, "'messages' is required"),
        ("/v1/chat/completions", {"messages": "hi"}, "non-empty array"),
        ("/v1/completions", {"model": "m"}, "'prompt' is required"),
        ("/completion", {"n_predict": 4}, "'prompt' is required"),
        (
            "/v1/chat/completions",
            {"model": 3, "messages": [{"role": "user", "content": "x"}]},
            "'model' must be",
        ),
    ],
)
def test_bad_bodies_are_refused(path: str, body: object, message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        parse(path, body)


def test_turns_of_one_conversation_share_a_key() -> None:
    first = parse("/v1/chat/completions", chat_body("plan a trip"))
    body = chat_body("plan a trip")
    assert isinstance(body["messages"], list)
    body["messages"] += [{"role": "assistant", "content": "where?"}, {"role": "user", "content": "Rome"}]
    second = parse("/v1/chat/completions", body)
    assert first.affinity_key == second.affinity_key
    assert (first.affinity_key or "").startswith("prefix:")


def test_conversations_with_a_shared_system_prompt_get_different_keys() -> None:
    one = parse("/v1/chat/completions", chat_body("plan a trip", system="shared"))
    other = parse("/v1/chat/completions", chat_body("write a poem", system="shared"))
    assert one.affinity_key != other.affinity_key


def test_the_model_is_part_of_the_key() -> None:
    one = parse("/v1/chat/completions", chat_body("hi"))
    other = parse("/v1/chat/completions", {**chat_body("hi"), "model": "other"})
    assert one.affinity_key != other.affinity_key


def test_session_header_then_user_field_take_precedence() -> None:
    body = chat_body("hi", user="alice")
    assert parse("/v1/chat/completions", body, {"x-session-id": "s1"}).affinity_key == "session:s1"
    assert parse("/v1/chat/completions", body).affinity_key == "user:alice"


def test_prompt_key_uses_only_the_leading_characters() -> None:
    long_a = parse_request(
        "/v1/completions", no_headers, json.dumps({"prompt": "x" * 50 + "a"}).encode(), prefix_chars=50
    )
    long_b = parse_request(
        "/v1/completions", no_headers, json.dumps({"prompt": "x" * 50 + "b"}).encode(), prefix_chars=50
    )
    assert long_a.affinity_key == long_b.affinity_key
