"""A bounded fuzz of the server's HTTP surface: whatever arrives, the server itself never answers
5xx, every error it makes is in OpenAI's shape, and every request is answered.

The backends are an in-memory fleet that answers every inference with a small completion, so a 5xx
can only be the server's own. It found uvicorn's own ``text/plain`` 400 for a control character in a
header; ``_http.py`` now answers those in OpenAI's shape too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llamacpp_ha_server import ServerConfig, create_app
from llamacpp_ha_server._config import ServerSettings

from llamacpp_ha import BackendConfig
from llamacpp_ha._routes import ROUTES

from ..mock_fleet import MockFleet
from .conftest import AppServer

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "system", "assistant", "tool"]) | JSON,
        "content": st.text(max_size=40) | JSON,
    },
)
BODY = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["tiny-random-llama", "nope"]) | JSON,
        "messages": st.lists(MESSAGE | JSON, max_size=3) | JSON,
        "prompt": st.text(max_size=40) | JSON,
        "stream": st.booleans() | JSON,
        "max_tokens": st.integers(-10, 10) | JSON,
        "n": st.integers(-2, 200) | JSON,
        "temperature": JSON,
        "id_slot": JSON,
        "input": JSON,
        "documents": JSON,
    },
)
RAW = st.one_of(
    BODY.map(lambda body: json.dumps(body).encode()),
    JSON.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"",
            b"{",
            b'{"messages": [',
            b"\xff\xfe",
            b'{"model": "\\ud800", "messages": []}',
            b"[" * 5000 + b"]" * 5000,
            b'{"a": ' * 3000 + b"1" + b"}" * 3000,
        ]
    ),
)
PATHS = st.sampled_from([*ROUTES, "/v1/models", "/health", "/monitor", "/metrics", "/", "/nope", "/v1/../x"])
METHODS = st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
HEADER_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=20).map(str.strip)


@pytest.fixture(scope="module")
def server() -> Iterator[AppServer]:
    fleet = MockFleet.of("gpu1", "gpu2")
    config = ServerConfig(backends=[BackendConfig(url=b.url, name=b.name) for b in fleet.backends.values()],
                          server=ServerSettings(max_body_bytes=1 << 20))  # fmt: skip
    app_server = AppServer(create_app(config, upstream=fleet.transport()))
    yield app_server
    app_server.stop()


def check(response: httpx2.Response) -> None:
    from_backend = "x-llamacpp-ha-backend" in response.headers
    if not from_backend:
        assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400 and response.request.method != "HEAD":
        error: Any = response.json()["error"]
        assert {"message", "type", "code"} <= set(error), error


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=METHODS, path=PATHS, body=RAW, title=HEADER_VALUES)
def test_whatever_arrives_the_server_answers_in_shape(
    server: AppServer, method: str, path: str, body: bytes, title: str
) -> None:
    headers = {"content-type": "application/json", "x-title": title.encode("latin-1")}
    with httpx2.Client(base_url=server.url, timeout=10) as client:
        response = client.request(method, path, content=body, headers=headers)  # type: ignore[arg-type]
        check(response)
        # The connection is still good after any answer: the next request on it works.
        assert client.get("/health").status_code == 200
