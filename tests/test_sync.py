"""ha_sync_client: the async engine behind a blocking client, on a private event loop."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import httpx2
import pytest
from openai import OpenAI

from llamacpp_ha import BackendConfig, BalancerConfig, ha_sync_client
from llamacpp_ha.sim import SimServer

from .helpers import chat

Sims = Callable[..., SimServer]
MODEL = "tiny-random-llama"


def busy_slots(url: str) -> int:
    return sum(slot["is_processing"] for slot in httpx2.get(f"{url}/slots").json())


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "llamacpp-ha-engine"]


def test_the_openai_sdk_works_through_the_sync_client(sims: Sims) -> None:
    sim = sims(slots=2)
    http = ha_sync_client(BalancerConfig(backends=[BackendConfig(url=sim.url)]))
    client = OpenAI(base_url="http://llamacpp-ha/v1", api_key="unused", http_client=http)
    completion = client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=4)
    assert completion.choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=4, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert http.balancer.snapshot().in_flight == 0
    http.close()


def test_closing_a_sync_stream_gives_the_slot_back(sims: Sims) -> None:
    sim = sims(slots=1, decode_tokens_per_s=50)
    http = ha_sync_client(BalancerConfig(backends=[BackendConfig(url=sim.url)]))
    client = OpenAI(base_url="http://llamacpp-ha/v1", api_key="unused", http_client=http)
    stream = client.chat.completions.create(model=MODEL, messages=chat("go"), max_tokens=300, stream=True)
    next(iter(stream))
    assert http.balancer.snapshot().in_flight == 1
    stream.close()
    assert http.balancer.snapshot().in_flight == 0
    wait_until(lambda: busy_slots(sim.url) == 0)
    http.close()


@pytest.mark.anyio
async def test_works_inside_a_running_event_loop(sims: Sims) -> None:
    sim = sims(slots=1)
    with ha_sync_client(BalancerConfig(backends=[BackendConfig(url=sim.url)])) as http:
        body = {"model": MODEL, "messages": chat("hi"), "max_tokens": 2}
        response = http.post("/v1/chat/completions", json=body)  # blocking, from inside this test's loop
        assert response.status_code == 200


def test_close_stops_the_engine(sims: Sims) -> None:
    sim = sims(slots=1)
    before = len(engine_threads())
    http = ha_sync_client(BalancerConfig(backends=[BackendConfig(url=sim.url)]))
    assert len(engine_threads()) == before + 1
    http.close()
    wait_until(lambda: len(engine_threads()) == before)
    assert http.balancer.closed


def test_interpreter_exit_never_hangs(sims: Sims) -> None:
    sim = sims(slots=1, decode_tokens_per_s=20)
    script = textwrap.dedent(f"""
        from openai import OpenAI
        from llamacpp_ha import BackendConfig, BalancerConfig, ha_sync_client
        http = ha_sync_client(BalancerConfig(backends=[BackendConfig(url="{sim.url}")]))
        client = OpenAI(base_url="http://llamacpp-ha/v1", api_key="unused", http_client=http)
        stream = client.chat.completions.create(
            model="tiny-random-llama", messages=[{{"role": "user", "content": "hi"}}], max_tokens=500, stream=True
        )
        next(iter(stream))
        print("streaming", flush=True)
        # exits with the client and the stream still open
    """)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "streaming"
    assert time.monotonic() - started < 20
    wait_until(lambda: busy_slots(sim.url) == 0)  # the finalizer closed the stream: the backend stopped


def test_ctrl_c_while_queued_cancels_the_request_not_just_the_wait(sims: Sims) -> None:
    import signal

    sim = sims(slots=1, decode_tokens_per_s=50)
    config = BalancerConfig(backends=[BackendConfig(url=sim.url)], poll_interval_s=0.2)
    with ha_sync_client(config) as http:
        client = OpenAI(base_url="http://llamacpp-ha/v1", api_key="unused", http_client=http, max_retries=0)
        with client.chat.completions.create(model=MODEL, messages=chat("a"), max_tokens=200, stream=True) as blocker:
            next(iter(blocker))  # the only slot is taken

            def interrupt(signum: int, frame: object) -> None:
                raise KeyboardInterrupt

            previous = signal.signal(signal.SIGALRM, interrupt)
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            try:
                with pytest.raises(KeyboardInterrupt):
                    client.chat.completions.create(model=MODEL, messages=chat("b"), max_tokens=5)  # queued
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
            wait_until(lambda: http.balancer.snapshot().queue_depth == 0)
        wait_until(lambda: http.balancer.snapshot().in_flight == 0)
        # Nothing was left queued to take the slot behind our back: the next request gets it.
        assert client.chat.completions.create(model=MODEL, messages=chat("c"), max_tokens=2).choices
        wait_until(lambda: busy_slots(sim.url) == 0)
        assert sim.app.inference_requests == 2
