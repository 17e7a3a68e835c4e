"""Narrow unit tests of HATransport over an in-memory fleet (httpx2.MockTransport)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import pytest
from pydantic import SecretStr

from llamacpp_ha import BackendConfig, BackendState, BalancerConfig, HATransport, RouteInfo

from .mock_fleet import ChunkStream, MockFleet, sse

pytestmark = pytest.mark.anyio

Client = Callable[..., httpx2.AsyncClient]
CHAT = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[MockFleet], httpx2.AsyncClient]]:
    made: list[httpx2.AsyncClient] = []

    def make(fleet: MockFleet, **settings: object) -> httpx2.AsyncClient:
        transport = HATransport(fleet.config(**settings), upstream=fleet.transport())
        client = httpx2.AsyncClient(transport=transport, base_url="http://llamacpp-ha")
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


def balancer_of(client: httpx2.AsyncClient) -> HATransport:
    transport = client._transport  # the one we passed in
    assert isinstance(transport, HATransport)
    return transport


async def test_rewrites_scheme_host_and_port_and_keeps_path_and_query(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1")
    client = client_for(fleet)
    response = await client.post(
        "/v1/chat/completions?trace=1",
        json=CHAT,
        headers={"x-conversation-id": "c1", "authorization": "Bearer user-key", "x-custom": "kept"},
    )
    assert response.status_code == 200
    (sent,) = fleet.requests
    assert str(sent.url) == "http://gpu1:8080/v1/chat/completions?trace=1"
    assert sent.headers["host"] == "gpu1:8080"
    assert "x-conversation-id" not in sent.headers
    assert sent.headers["authorization"] == "Bearer user-key"  # no backend key: the caller's goes through
    assert sent.headers["x-custom"] == "kept"
    assert json.loads(sent.content) == CHAT


async def test_backend_api_key_and_path_prefix() -> None:
    fleet = MockFleet.of("gpu1")
    config = BalancerConfig(backends=[BackendConfig(url="http://gpu1:8080/llama/", api_key=SecretStr("secret"))])
    polled: list[tuple[str, str]] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        polled.append((request.url.path, request.headers["authorization"]))
        request.url = request.url.copy_with(raw_path=request.url.raw_path.removeprefix(b"/llama"))
        return fleet.handle(request)

    async with httpx2.AsyncClient(transport=HATransport(config, upstream=httpx2.MockTransport(handle))) as client:
        response = await client.post("http://x/v1/chat/completions", json=CHAT, headers={"x-api-key": "user"})
    assert response.status_code == 200
    assert {path for path, _ in polled} >= {"/llama/health", "/llama/slots", "/llama/v1/chat/completions"}
    assert {auth for _, auth in polled} == {"Bearer secret"}
    assert "x-api-key" not in fleet.requests[0].headers


async def test_routing_facts_in_header_and_extensions(client_for: Client) -> None:
    client = client_for(MockFleet.of("gpu1"))
    long_chat = {**CHAT, "messages": [{"role": "user", "content": "tell me more " * 100}]}
    for expected in ("new", "hit"):
        response = await client.post("/v1/chat/completions", json=long_chat)
        assert response.headers["x-llamacpp-ha-backend"] == "gpu1"
        info = response.extensions["llamacpp_ha"]
        assert isinstance(info, RouteInfo)
        assert (info.backend, info.attempts, info.affinity) == ("gpu1", 1, expected)
        assert info.queued_s >= 0
    assert info.expected_cached_tokens > 0
    # A prompt shorter than one block has nothing to cache: no affinity outcome.
    short = await client.post("/v1/chat/completions", json=CHAT)
    assert short.extensions["llamacpp_ha"].affinity is None


async def test_a_stale_pooled_connection_is_retried_on_the_same_backend(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1", "gpu2")
    calls = 0

    def flaky(request: httpx2.Request) -> httpx2.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx2.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return httpx2.Response(200, json={"ok": True})

    for backend in fleet.backends.values():
        backend.inference = flaky
    client = client_for(fleet)
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert len({r.url.host for r in fleet.requests}) == 1  # same backend twice, no failover
    assert response.extensions["llamacpp_ha"].attempts == 1
    assert balancer_of(client).balancer.snapshot().in_flight == 0


async def test_no_hop_by_hop_header_reaches_a_backend(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1")
    client = client_for(fleet)
    hop = {"te": "trailers", "upgrade": "h2c", "proxy-authorization": "Basic eA==", "trailer": "x-t", "keep-alive": "5"}
    response = await client.post("/v1/chat/completions", json=CHAT, headers={**hop, "x-kept": "yes"})
    assert response.status_code == 200
    (sent,) = fleet.requests
    assert not set(hop) & set(sent.headers)
    assert sent.headers["x-kept"] == "yes"


async def test_a_streamed_request_asks_for_its_connection_to_be_closed(client_for: Client) -> None:
    # llama-server closes it after the stream anyway; pooled, it would fail the next request.
    fleet = MockFleet.of("gpu1")
    client = client_for(fleet)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert (await client.post("/v1/chat/completions", json={**CHAT, "stream": True})).status_code == 200
    plain, streamed = fleet.requests
    assert plain.headers.get("connection") is None
    assert streamed.headers["connection"] == "close"


async def test_a_reset_on_a_reused_connection_is_retried_like_a_disconnect(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1")
    calls = 0

    def reset(request: httpx2.Request) -> httpx2.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx2.ReadError("[Errno 104] Connection reset by peer", request=request)
        return httpx2.Response(200, json={"ok": True})

    fleet.backends["gpu1"].inference = reset
    client = client_for(fleet)
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.extensions["llamacpp_ha"].attempts == 1
    assert balancer_of(client).balancer.snapshot().in_flight == 0


async def test_a_refused_connection_fails_over_and_marks_the_backend_dead(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1", "gpu2")
    client = client_for(fleet, policy="round_robin")
    await balancer_of(client).balancer.start()
    fleet.backends["gpu1"].reachable = False
    fleet.backends["gpu2"].reachable = False
    hosts = []
    for _ in range(2):
        fleet.backends["gpu2"].reachable = True
        response = await client.post("/v1/chat/completions", json=CHAT)
        hosts.append(response.headers["x-llamacpp-ha-backend"])
    assert hosts == ["gpu2", "gpu2"]
    balancer = balancer_of(client).balancer
    assert balancer.backend("gpu1").state is BackendState.DEAD
    assert balancer.stats.retries >= 1
    assert balancer.snapshot().in_flight == 0


async def test_a_loading_backend_is_skipped(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1", "gpu2")
    client = client_for(fleet)
    await balancer_of(client).balancer.start()
    loading = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
    fleet.backends["gpu1"].inference = lambda request: httpx2.Response(503, json=loading)
    fleet.backends["gpu2"].busy = 0
    for _ in range(3):
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        assert response.headers["x-llamacpp-ha-backend"] == "gpu2"


async def test_failover_exhausted_is_503_that_the_sdk_must_not_retry(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1", "gpu2")
    client = client_for(fleet)
    await balancer_of(client).balancer.start()
    for backend in fleet.backends.values():
        backend.reachable = False
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 503
    assert response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    assert error["code"] == "no_backend_available"
    assert "gpu1" in error["message"]
    assert "gpu2" in error["message"]
    assert {"message", "type", "code"} <= set(error) <= {"message", "type", "code", "param"}
    assert balancer_of(client).balancer.snapshot().in_flight == 0


async def test_an_upstream_client_error_passes_through_unchanged(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1")
    body = {
        "error": {
            "code": 400,
            "message": "request (2263 tokens) exceeds ...",
            "type": "exceed_context_size_error",
        }
    }
    fleet.backends["gpu1"].inference = lambda request: httpx2.Response(400, json=body)
    client = client_for(fleet)
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 400
    assert response.json() == body
    assert len(fleet.requests) == 1


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"model": "m"}'], ids=["not-json", "not-object", "no-messages"])
async def test_a_bad_body_is_400_without_touching_a_backend(client_for: Client, body: bytes) -> None:
    fleet = MockFleet.of("gpu1")
    client = client_for(fleet)
    response = await client.post("/v1/chat/completions", content=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert fleet.requests == []


async def test_an_unknown_model_is_404_listing_the_available_ones(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1")
    client = client_for(fleet)
    response = await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-7"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert "tiny-random-llama.gguf" in error["message"]
    assert fleet.requests == []


async def test_unknown_models_may_go_anywhere_when_allowed(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1")
    client = client_for(fleet, allow_unknown_models=True)
    response = await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-7"})
    assert response.status_code == 200


async def test_models_are_listed_from_the_registry(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1", "gpu2")
    fleet.backends["gpu2"].model = "big.gguf"
    client = client_for(fleet)
    response = await client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny-random-llama.gguf", "big.gguf"]
    assert fleet.requests == []


async def test_a_stream_cut_mid_way_ends_with_an_error_event_and_frees_the_slot(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1")
    chunks = sse({"choices": [{"index": 0, "delta": {"content": "he"}}]})
    body = ChunkStream(chunks, fail=httpx2.ReadError("connection reset"))
    fleet.backends["gpu1"].inference = lambda request: httpx2.Response(
        200, headers={"content-type": "text/event-stream"}, stream=body
    )
    client = client_for(fleet)
    async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        events = [line async for line in response.aiter_lines() if line]
    assert events[0] == chunks[0].decode().strip()
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "backend_failed"
    snapshot = balancer_of(client).balancer.snapshot()
    assert snapshot.in_flight == 0
    assert snapshot.counters.stream_failures == 1
    assert body.closed


async def test_a_plain_body_cut_mid_way_raises_and_frees_the_slot(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1")
    body = ChunkStream([b'{"choices": '], fail=httpx2.ReadError("connection reset"))
    fleet.backends["gpu1"].inference = lambda request: httpx2.Response(
        200, headers={"content-type": "application/json"}, stream=body
    )
    client = client_for(fleet)
    with pytest.raises(httpx2.ReadError):
        await client.post("/v1/chat/completions", json=CHAT)
    assert balancer_of(client).balancer.snapshot().in_flight == 0


async def test_the_slot_is_held_until_the_body_is_finished(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1")
    body = ChunkStream(sse({"n": 1}, {"n": 2}))
    fleet.backends["gpu1"].inference = lambda request: httpx2.Response(
        200, headers={"content-type": "text/event-stream"}, stream=body
    )
    client = client_for(fleet)
    balancer = balancer_of(client).balancer
    async with client.stream("POST", "/v1/chat/completions", json=CHAT) as response:
        assert balancer.snapshot().in_flight == 1  # headers are here, the body is not read yet
        iterator = response.aiter_raw()
        await iterator.__anext__()
        assert balancer.snapshot().in_flight == 1
        await iterator.aclose()
    assert balancer.snapshot().in_flight == 0


async def test_requests_without_a_slot_go_to_any_backend(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1")
    fleet.backends["gpu1"].inference = lambda request: httpx2.Response(200, json={"tokens": [1, 2]})
    client = client_for(fleet)
    response = await client.post("/tokenize", json={"content": "hi"})
    assert response.json() == {"tokens": [1, 2]}
    assert response.headers["x-llamacpp-ha-backend"] == "gpu1"
    assert balancer_of(client).balancer.stats.dispatched == 0  # took no slot


async def test_a_header_value_that_is_not_ascii_is_forwarded_as_sent(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1")
    client = client_for(fleet)
    raw = [(b"x-title", "café".encode()), (b"content-type", b"application/json")]
    request = httpx2.Request("POST", "http://x/v1/chat/completions", headers=raw, content=json.dumps(CHAT).encode())
    response = await client.send(request)
    assert response.status_code == 200
    (sent,) = fleet.requests
    assert (b"x-title", "café".encode()) in sent.headers.raw


async def test_user_info_in_a_backend_url_becomes_basic_auth_and_never_shows() -> None:
    fleet = MockFleet.of("gpu1")
    seen: list[httpx2.Request] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return fleet.handle(request)

    config = BalancerConfig(backends=[BackendConfig(url="http://admin:pw@gpu1:8080", name="gpu1")])
    transport = HATransport(config, upstream=httpx2.MockTransport(handle))
    async with httpx2.AsyncClient(transport=transport) as client:
        response = await client.post("http://x/v1/chat/completions", json=CHAT)
        snapshot = transport.balancer.snapshot()
    assert response.status_code == 200
    assert all(r.url.userinfo == b"" for r in seen)
    assert {r.headers["authorization"] for r in seen} == {"Basic YWRtaW46cHc="}
    assert snapshot.backends[0].url == "http://***@gpu1:8080"


async def test_id_slot_is_stripped_so_a_pinned_busy_slot_cannot_defer_a_request(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1")
    client = client_for(fleet)
    response = await client.post("/v1/chat/completions", json={**CHAT, "id_slot": 1, "temperature": 0.5})
    assert response.status_code == 200
    (sent,) = fleet.requests
    assert json.loads(sent.content) == {**CHAT, "temperature": 0.5}
    raw = b'{"model":"tiny-random-llama",   "messages":[{"role":"user","content":"hi"}]}'
    await client.post("/v1/chat/completions", content=raw)
    assert fleet.requests[1].content == raw  # untouched, byte for byte, without id_slot


async def test_a_rewritten_body_goes_with_its_own_length_over_a_real_socket(sims: Callable[..., Any]) -> None:
    """The caller's Content-Length described the body before ``id_slot`` was stripped (an h11
    LocalProtocolError and a 503 until the fuzzer found it: the mock fleet never checked lengths)."""
    from llamacpp_ha import ha_client

    sim = sims(slots=1)
    async with ha_client(BalancerConfig(backends=[BackendConfig(url=sim.url)])) as http:
        response = await http.post("http://x/v1/chat/completions", json={**CHAT, "max_tokens": 2, "id_slot": 0})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]


async def test_a_slotless_route_with_a_bad_body_is_400_without_a_backend(client_for: Client) -> None:
    fleet = MockFleet.of("gpu1")
    client = client_for(fleet)
    response = await client.post("/tokenize", content=b"{bad")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert fleet.requests == []
    assert (await client.post("/tokenize", json={"content": "hi"})).status_code == 200


async def test_any_failure_before_the_first_byte_moves_the_request_to_another_backend(client_for: Client) -> None:
    # Seen under backend kills: an error from the HTTP stack outside httpx's own hierarchy.
    fleet = MockFleet.of("gpu1", "gpu2")
    client = client_for(fleet)

    def broken(request: httpx2.Request) -> httpx2.Response:
        raise AttributeError("'NoneType' object has no attribute 'send'")

    fleet.backends["gpu1"].inference = broken
    fleet.backends["gpu2"].inference = lambda request: httpx2.Response(200, json={"ok": True})
    for _ in range(4):
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        assert response.headers["x-llamacpp-ha-backend"] == "gpu2"
    assert balancer_of(client).balancer.snapshot().in_flight == 0


async def test_back_to_back_streams_survive_llama_servers_closed_connections() -> None:
    # The simulated llama-server closes the TCP connection after each stream, as the real one does;
    # the pooled connection fails before the request reaches it, and is retried on the same backend.
    from llamacpp_ha import ha_client
    from llamacpp_ha.sim import SimServer

    with SimServer(slots=2) as sim:
        config = BalancerConfig(backends=[BackendConfig(url=sim.url)])
        async with ha_client(config) as client:
            for i in range(20):
                body = {**CHAT, "stream": True, "max_tokens": 3, "seed": i}
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    assert response.status_code == 200
                    text = "".join([chunk async for chunk in response.aiter_text()])
                assert text.rstrip().endswith("data: [DONE]")
                assert response.extensions["llamacpp_ha"].attempts == 1
        assert sim.app.inference_requests == 20
