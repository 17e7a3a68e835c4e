from __future__ import annotations

import json

import pytest

from llamacpp_ha import BadRequestError
from llamacpp_ha._request import RequestFacts, parse_request
from llamacpp_ha._routes import ROUTES


def parse(path: str, body: object, headers: dict[str, str] | None = None, block_bytes: int = 64) -> RequestFacts:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(ROUTES[path], (headers or {}).get, raw, block_bytes, 1024)


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
        ("/v1/chat/completions", {"messages": [1]}, r"'messages\[0\]' must be an object"),
        ("/v1/chat/completions", {"messages": [{"content": "x"}]}, r"role' must be a string"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "string or an array"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}], "max_tokens": -5}, "'max_tokens' must be"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}], "n": 0}, "'n' must be"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}], "stream": "yes"}, "'stream' must be"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}], "temperature": "hot"}, "'temperature' must be"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}], "model": "\ud800"}, "not valid Unicode"),
        ("/v1/completions", {"model": "m"}, "'prompt' is required"),
        ("/completion", {"n_predict": 4}, "'prompt' is required"),
        ("/completion", {"prompt": "x", "n_predict": -2}, "'n_predict' must be"),
        (
            "/v1/chat/completions",
            {"model": 3, "messages": [{"role": "user", "content": "x"}]},
            "'model' must be",
        ),
        ("/v1/chat/completions", b"[" * 3000 + b"]" * 3000, "nested too deeply|must be a JSON object"),
    ],
)
def test_bad_bodies_are_refused(path: str, body: object, message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        parse(path, body)


def test_n_predict_minus_one_means_unlimited_and_is_accepted() -> None:
    assert parse("/completion", {"prompt": "x", "n_predict": -1}).stream is False


def test_infill_needs_no_prompt() -> None:
    # llama-server's /infill takes input_prefix/input_suffix alone.
    facts = parse("/infill", {"input_prefix": "def f(", "input_suffix": "):\n"})
    assert facts.prompt.weight == 1


def test_session_header_then_user_field_pin_the_conversation() -> None:
    body = chat_body("hi", user="alice")
    assert parse("/v1/chat/completions", body, {"x-session-id": "s1"}).pin == "session:s1"
    assert parse("/v1/chat/completions", body).pin == "user:alice"
    assert parse("/v1/chat/completions", chat_body("hi")).pin is None
