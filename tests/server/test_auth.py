"""API keys: Bearer keys compared in constant time, exempt paths, names in place of keys."""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx2
import openai
import pytest
from llamacpp_ha_server import ServerConfig, ServerSettings, create_app
from pydantic import SecretStr

from llamacpp_ha import BackendConfig
from llamacpp_ha.sim import SimServer

from ..helpers import chat
from ..mock_fleet import MockFleet
from .conftest import AppServer

pytestmark = pytest.mark.anyio

Sims = Callable[..., SimServer]
Serve = Callable[..., AppServer]
KEYS = [{"key": "sk-alice-secret", "name": "alice"}, "sk-unnamed-secret"]
BODY = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": "Bearer sk-alice-secre"},
        {"x-api-key": "sk-alice-secret"},
    ],
    ids=["none", "wrong", "prefix-of-a-key", "x-api-key-is-not-ours"],
)
async def test_requests_without_a_valid_key_get_401(sims: Sims, serve: Serve, headers: dict[str, str]) -> None:
    sim = sims(slots=1)
    server = serve(sim, server={"api_keys": KEYS})
    async with httpx2.AsyncClient(base_url=server.url) as http:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/monitor/data")):
            response = await http.request(method, path, json=BODY if method == "POST" else None, headers=headers)
            assert response.status_code == 401, path
            assert response.json()["error"]["type"] == "authentication_error"
    assert sim.app.inference_requests == 0


async def test_any_configured_key_works_and_exempt_paths_are_open(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=1), server={"api_keys": KEYS})
    for key in ("sk-alice-secret", "sk-unnamed-secret"):
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0) as client:
            assert (
                await client.chat.completions.create(model="tiny-random-llama", messages=chat("a"), max_tokens=2)
            ).choices
    async with httpx2.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/health")).status_code == 200
        assert (await http.head("/health")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200
        # Without CORS origins an OPTIONS is a request like any other: no key, no answer about routes.
        for path in ("/v1/chat/completions", "/no/such/route"):
            response = await http.options(path)
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"


async def test_keys_never_show_only_their_names(sims: Sims, serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = serve(sims(slots=1), server={"api_keys": KEYS})
    headers = {"authorization": "Bearer sk-alice-secret"}
    async with httpx2.AsyncClient(base_url=server.url, headers=headers) as http:
        assert (await http.post("/v1/chat/completions", json=BODY)).status_code == 200
        metrics = (await http.get("/metrics")).text
        monitor = (await http.get("/monitor/data")).text
    assert 'key="alice"' in metrics
    assert '"alice"' in monitor
    assert '"key-2"' in monitor  # the unnamed key gets a name
    for text in (metrics, monitor, caplog.text):
        assert "sk-alice-secret" not in text
        assert "sk-unnamed-secret" not in text


async def test_the_proxy_key_does_not_reach_a_backend() -> None:
    fleet = MockFleet.of("gpu1", "gpu2")
    backends = [BackendConfig(url="http://gpu1:8080", name="gpu1"), BackendConfig(url="http://gpu2:8080", name="gpu2",
                api_key=SecretStr("backend-key"))]  # fmt: skip
    settings = ServerSettings.model_validate({"api_keys": KEYS})
    config = ServerConfig(backends=backends, server=settings, policy="round_robin")
    server = AppServer(create_app(config, upstream=fleet.transport()))
    try:
        async with httpx2.AsyncClient(base_url=server.url, headers={"authorization": "Bearer sk-alice-secret"}) as http:
            for _ in range(2):
                assert (await http.post("/v1/chat/completions", json=BODY)).status_code == 200
    finally:
        server.stop()
    (to_plain,) = fleet.inference_to("gpu1")
    (to_keyed,) = fleet.inference_to("gpu2")
    assert "authorization" not in to_plain.headers
    assert to_keyed.headers["authorization"] == "Bearer backend-key"


async def test_without_keys_everything_is_open(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=1))
    async with httpx2.AsyncClient(base_url=server.url) as http:
        assert (await http.post("/v1/chat/completions", json=BODY)).status_code == 200
        assert (await http.get("/monitor/data")).status_code == 200


async def test_cors_origins_are_allowed_when_configured(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=1), server={"api_keys": KEYS, "cors_origins": ["http://localhost:3000"]})
    preflight_headers = {"origin": "http://localhost:3000", "access-control-request-method": "POST"}
    async with httpx2.AsyncClient(base_url=server.url) as http:
        preflight = await http.options("/v1/chat/completions", headers=preflight_headers)
        other = await http.options("/v1/chat/completions", headers={**preflight_headers, "origin": "http://evil"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("keys", [[""], ["   "], [{"key": "", "name": "empty"}]])
def test_an_empty_or_blank_key_is_a_config_error(keys: list[object]) -> None:
    # An empty key would match a request that sends none: authentication off by accident.
    with pytest.raises(ValueError, match="must not be empty or blank"):
        ServerSettings.model_validate({"api_keys": keys})


async def test_backend_credentials_never_show(sims: Sims, serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    from llamacpp_ha._backend import redact_url

    assert redact_url("http://admin:pw@gpu-1:8080/llama") == "http://***@gpu-1:8080/llama"
    assert redact_url("http://gpu-1:8080") == "http://gpu-1:8080"
    caplog.set_level(logging.DEBUG)
    sim = sims(slots=1)
    server = serve(sim.url.replace("http://", "http://admin:hunter2@"))
    async with httpx2.AsyncClient(base_url=server.url) as http:
        monitor = (await http.get("/monitor/data")).text
        health = (await http.get("/health")).text
    assert "***@127.0.0.1" in monitor
    for text in (monitor, health, caplog.text):
        assert "hunter2" not in text
