"""/metrics in Prometheus' exposition format, parsed with prometheus-client's own parser."""

from __future__ import annotations

from collections.abc import Callable

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamacpp_ha.sim import SimServer

from .conftest import AppServer

pytestmark = pytest.mark.anyio

Sims = Callable[..., SimServer]
Serve = Callable[..., AppServer]
BODY = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_metrics_describe_requests_queue_and_backends(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=2), sims(slots=3))
    async with httpx2.AsyncClient(base_url=server.url) as http:
        for _ in range(3):
            assert (await http.post("/v1/chat/completions", json=BODY)).status_code == 200
        assert (await http.post("/v1/chat/completions", json={**BODY, "model": "gpt-7"})).status_code == 404
        text = (await http.get("/metrics")).text
    families = {family.name: family for family in text_string_to_metric_families(text)}

    requests = {
        (s.labels["backend"], s.labels["status"]): s.value for s in families["llamacpp_ha_requests"].samples
        if s.name == "llamacpp_ha_requests_total"
    }  # fmt: skip
    assert sum(v for (_, status), v in requests.items() if status == "200") == 3
    assert requests[("-", "404")] == 1
    assert {s.labels["backend"]: s.value for s in families["llamacpp_ha_backend_capacity"].samples} == {
        "b0": 2,
        "b1": 3,
    }
    assert {s.labels["backend"]: s.value for s in families["llamacpp_ha_backend_in_flight"].samples} == {
        "b0": 0,
        "b1": 0,
    }
    healthy = {
        s.labels["backend"] for s in families["llamacpp_ha_backend_state"].samples
        if s.labels["state"] == "healthy" and s.value == 1
    }  # fmt: skip
    assert healthy == {"b0", "b1"}
    assert families["llamacpp_ha_queue_depth"].samples[0].value == 0
    wait_count = next(s.value for s in families["llamacpp_ha_queue_wait_seconds"].samples if s.name.endswith("_count"))
    assert wait_count == 3
    ttfb_count = next(
        s.value for s in families["llamacpp_ha_time_to_first_byte_seconds"].samples if s.name.endswith("_count")
    )
    assert ttfb_count == 4  # the 404 has a body too
    for name in (
        "llamacpp_ha_retries", "llamacpp_ha_affinity_hits", "llamacpp_ha_affinity_misses", "llamacpp_ha_parked",
        "llamacpp_ha_parked_wait_seconds", "llamacpp_ha_parked_wait_predicted_seconds", "llamacpp_ha_patience_ran_out",
    ):  # fmt: skip
        assert name in families


async def test_two_apps_have_their_own_metrics(sims: Sims, serve: Serve) -> None:
    sim = sims(slots=2)
    first, second = serve(sim), serve(sim)
    async with httpx2.AsyncClient() as http:
        assert (await http.post(f"{first.url}/v1/chat/completions", json=BODY)).status_code == 200
        first_text = (await http.get(f"{first.url}/metrics")).text
        second_text = (await http.get(f"{second.url}/metrics")).text
    assert 'status="200"' in first_text
    assert 'status="200"' not in second_text
    assert first.context.balancer is not second.context.balancer
    assert first.context.metrics.registry is not second.context.metrics.registry
