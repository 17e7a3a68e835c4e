"""Replay the captured llama-server requests against the simulator and compare the answers.

The requests come from the fixture README's table (the capture's own record of what was
sent); they are replayed in capture order against one simulator per captured server, so
stateful answers (a repeated prompt hitting the cache, idle slots keeping their last task)
line up. Compared: status, content type, keep-alive vs close, JSON shape (keys and value
types, recursively), error type and code, SSE event count and the shape of each event.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from llamacpp_ha.sim import SimServer

FIXTURES = Path(__file__).parent.parent / "fixtures" / "llama-server"

# The simulator configured like each captured server (see the fixture README).
SERVERS: dict[str, dict[str, Any]] = {
    "A": {"model": "tiny-random-llama.gguf", "slots": 2, "n_ctx": 1024},
    "B-loading": {"model": "big-random-llama.gguf", "slots": 2, "n_ctx": 2048, "loading_s": 60},
    "B": {"model": "big-random-llama.gguf", "slots": 2, "n_ctx": 2048},
    "C": {
        "model": "tiny-random-llama.gguf", "slots": 2, "n_ctx": 1024, "api_key": "test-key-123",
        "slots_endpoint": False, "metrics": False, "aliases": ("tiny-alias", "tiny-chat"),
    },
}  # fmt: skip

NOT_REPLAYED = {
    "slots-action-": "slot save/restore/erase (needs --slot-save-path) is not simulated",
    "router-": "router mode (several models per server) is not simulated",
    "sleep-": "sleep mode is not simulated",
    "slots-prompt-processing": "captured mid-flight under load",
    "metrics-prompt-processing": "captured mid-flight under load",
    "chat-completions-stream-long-L1": "captured mid-flight under load (observations-busy-queue.txt)",
    "slots-one-busy": "captured mid-flight under load",
    "metrics-one-busy": "captured mid-flight under load",
    "slots-all-busy": "captured mid-flight under load",
    "health-all-slots-busy": "captured mid-flight under load",
    "metrics-all-busy": "captured mid-flight under load",
    "metrics-with-deferred": "captured mid-flight under load",
    "slots-with-deferred": "captured mid-flight under load",
    "health-with-deferred": "captured mid-flight under load",
    "slots-idle-after-busy": "captured after the load scenario",
    "metrics-idle-after-busy": "captured after the load scenario",
    "metrics-id-slot-pinned-deferred": "captured mid-flight under load",
    "slots-id-slot-pinned-deferred": "captured mid-flight under load",
}
STATELESS_B = {"chat-completions-n2", "error-chat-n-exceeds-slots", "completions-oai-two-prompts"}
WORDS = [
    "alpha",
    "bravo",
    "castle",
    "delta",
    "echo",
    "forest",
    "galaxy",
    "hotel",
    "island",
    "juliet",
    "kilo",
    "lima",
    "meteor",
    "november",
]


@dataclass
class Capture:
    name: str
    server: str
    method: str
    path: str
    body: bytes | None
    headers: dict[str, str]


def _placeholders(text: str) -> str:
    rng = random.Random(7)
    return re.sub(r"<(\d+) words>", lambda m: " ".join(rng.choice(WORDS) for _ in range(int(m[1]))), text)


def captures() -> Iterator[Capture]:
    row = re.compile(r"^\| `(?P<file>[^`]+)\.http` \| (?P<server>\w) \| [^|]+ \| `(?P<request>[^`]+)` \|")
    for line in (FIXTURES / "README.md").read_text().splitlines():
        match = row.match(line)
        if match is None:
            continue
        request = match["request"]
        headers = {}
        header = re.search(r" \[([A-Za-z-]+): ([^\]]+)\]$", request)
        if header:
            headers[header[1]] = header[2]
            request = request[: header.start()]
        method, _, rest = request.partition(" ")
        path, _, body = rest.partition(" ")
        yield Capture(
            match["file"],
            match["server"],
            method,
            path,
            _placeholders(body).encode() if body else None,
            headers,
        )


def _server_for(capture: Capture) -> str | None:
    if any(capture.name.startswith(prefix) for prefix in NOT_REPLAYED):
        return None
    if capture.server == "B":
        if capture.name.endswith("-loading"):
            return "B-loading"
        return "B" if capture.name in STATELESS_B else None
    return capture.server if capture.server in ("A", "C") else None


@dataclass
class Recorded:
    status: int
    headers: dict[str, str]
    body: str


def parse_http(text: str) -> Recorded:
    head, _, body = text.partition("\n\n")
    status_line, *header_lines = head.splitlines()
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return Recorded(int(status_line.split()[1]), headers, body)


def shape(value: Any) -> Any:
    """Keys and value types, recursively; numbers are one type (llama-server prints 0.0 and 0 alike)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def assert_same_shape(expected: Any, actual: Any, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        assert list(expected) == list(actual), f"{where}: keys differ"
        for key in expected:
            assert_same_shape(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), f"{where}: expected an array, got {actual!r}"
        if expected and actual:
            assert_same_shape(expected[0], actual[0], f"{where}[0]")
    else:
        assert expected == actual, f"{where}: {expected} != {actual}"


def sse_events(body: str) -> list[str]:
    return [event.removeprefix("data: ") for event in body.split("\n\n") if event.strip()]


def compare(capture: Capture, recorded: Recorded, response: httpx2.Response) -> None:
    name = capture.name
    assert response.status_code == recorded.status, name
    assert response.headers.get("content-type") == recorded.headers.get("content-type"), name
    assert response.headers["server"] == "llama.cpp", name
    assert ("connection" in response.headers) == ("connection" in recorded.headers), f"{name}: Connection: close"
    content_type = recorded.headers.get("content-type", "")
    if content_type.startswith("text/event-stream"):
        expected, actual = sse_events(recorded.body), sse_events(response.text)
        assert len(actual) == len(expected), f"{name}: {len(actual)} events, captured {len(expected)}"
        for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
            if want == "[DONE]":
                assert got == "[DONE]", f"{name}: event {i}"
            else:
                assert_same_shape(shape(json.loads(want)), shape(json.loads(got)), f"{name}: event {i}")
    elif content_type.startswith("application/json"):
        want, got = json.loads(recorded.body), response.json()
        assert_same_shape(shape(want), shape(got), name)
        if "error" in want:
            assert (got["error"]["type"], got["error"]["code"]) == (
                want["error"]["type"],
                want["error"]["code"],
            )
    elif content_type.startswith("text/plain"):
        names = {line for line in recorded.body.splitlines() if line.startswith("# ")}
        assert {line for line in response.text.splitlines() if line.startswith("# ")} == names, name


def test_every_fixture_is_replayed_or_skipped_for_a_stated_reason() -> None:
    listed = {capture.name for capture in captures()}
    on_disk = {path.stem for path in FIXTURES.glob("*.http")}
    # Described in the README's observation notes rather than its table: captured under load.
    assert on_disk - listed == {"chat-completions-stream-after-queue"}
    replayed = {capture.name for capture in captures() if _server_for(capture)}
    assert len(replayed) >= 60


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_the_simulator_answers_like_the_captured_server(server: str) -> None:
    selected = [capture for capture in captures() if _server_for(capture) == server]
    assert selected
    config = SERVERS[server] | {"prefill_tokens_per_s": math.inf, "decode_tokens_per_s": math.inf}
    with SimServer(**config) as sim, httpx2.Client(base_url=sim.url, timeout=10) as client:
        for capture in selected:
            recorded = parse_http((FIXTURES / f"{capture.name}.http").read_text())
            response = client.request(capture.method, capture.path, content=capture.body, headers=capture.headers)
            compare(capture, recorded, response)
