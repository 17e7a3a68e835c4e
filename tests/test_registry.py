"""What the balancer polls, and what it makes of the answers (in-memory fleet)."""

from __future__ import annotations

import asyncio

import pytest

from llamacpp_ha import BackendState, Balancer

from .mock_fleet import MockFleet

pytestmark = pytest.mark.anyio


async def polled(fleet: MockFleet, rounds: int = 3) -> Balancer:
    balancer = Balancer(fleet.config(), poll_transport=fleet.transport())
    for _ in range(rounds):
        await balancer.poll_now()
    return balancer


async def test_a_sleeping_backend_is_routable_and_its_slots_are_not_polled() -> None:
    fleet = MockFleet.of("gpu1", "gpu2")
    fleet.backends["gpu1"].sleeping = True
    balancer = await polled(fleet)
    assert "gpu1 /slots" not in fleet.polls  # /slots would wake it up
    assert "gpu2 /slots" in fleet.polls
    sleeping = balancer.snapshot().backend("gpu1")
    assert (sleeping.state, sleeping.sleeping, sleeping.free) == (BackendState.HEALTHY, True, 2)
    await balancer.aclose()


async def test_metrics_are_never_polled() -> None:
    fleet = MockFleet.of("gpu1")
    balancer = await polled(fleet, rounds=5)
    assert fleet.requests == []  # /metrics (or anything but the four poll paths) was never asked for
    assert {poll.split()[1] for poll in fleet.polls} == {"/health", "/props", "/v1/models", "/slots"}
    await balancer.aclose()


async def test_busy_slots_seen_by_a_poll_are_not_free() -> None:
    fleet = MockFleet.of("gpu1", slots=4)
    fleet.backends["gpu1"].busy = 3
    balancer = await polled(fleet, rounds=1)
    backend = balancer.snapshot().backend("gpu1")
    assert (backend.capacity, backend.busy, backend.external, backend.free) == (4, 3, 3, 1)
    await balancer.aclose()


async def test_states_follow_the_backend() -> None:
    fleet = MockFleet.of("gpu1")
    balancer = await polled(fleet, rounds=1)
    assert balancer.backend("gpu1").state is BackendState.HEALTHY
    fleet.backends["gpu1"].health = 503
    await balancer.poll_now()
    assert balancer.backend("gpu1").state is BackendState.LOADING
    fleet.backends["gpu1"].reachable = False
    await balancer.poll_now()
    assert balancer.backend("gpu1").state is BackendState.DEAD
    assert "ConnectError" in balancer.backend("gpu1").reason
    fleet.backends["gpu1"].reachable = True
    fleet.backends["gpu1"].health = 200
    await balancer.poll_now()
    assert balancer.backend("gpu1").state is BackendState.HEALTHY
    await balancer.aclose()


async def test_nothing_outlives_aclose() -> None:
    fleet = MockFleet.of("gpu1", "gpu2")
    balancer = Balancer(fleet.config(poll_interval_s=0.01), poll_transport=fleet.transport())
    await balancer.start()
    await asyncio.sleep(0.05)
    ours = [t for t in asyncio.all_tasks() if t.get_name().startswith("llamacpp-ha")]
    assert ours  # the poller and its per-backend polls run
    await balancer.aclose()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("llamacpp-ha") and not t.done()]


async def test_a_waiting_request_gets_503_when_the_balancer_closes() -> None:
    from llamacpp_ha import BalancerClosedError
    from llamacpp_ha._request import RequestFacts

    fleet = MockFleet.of("gpu1", slots=1)
    balancer = Balancer(fleet.config(), poll_transport=fleet.transport())
    facts = RequestFacts(model=None, stream=False)
    lease = await balancer.acquire(facts)
    waiting = asyncio.create_task(balancer.acquire(facts))
    await asyncio.sleep(0.01)
    assert balancer.snapshot().queue_depth == 1
    await balancer.aclose()
    with pytest.raises(BalancerClosedError):
        await waiting
    lease.release()
    assert balancer.snapshot().in_flight == 0


async def test_a_balancer_shows_itself_as_tables() -> None:
    fleet = MockFleet.of("gpu1", "gpu<2>", slots=3)
    fleet.backends["gpu1"].busy = 2
    balancer = await polled(fleet, rounds=1)
    text = repr(balancer)
    lines = text.splitlines()
    assert lines[0].startswith("llamacpp-ha: policy affinity · queue 0")
    assert lines[1].split() == ["backend", "state", "slots", "models", "requests", "errors"]
    assert lines[2].split()[:4] == ["gpu1", "healthy", "...", "0/3"]
    html = balancer._repr_html_()
    assert html.count("<tr>") == 3  # header and two backends
    assert "gpu&lt;2&gt;" in html  # names are escaped
    assert html.count("background:#8c959f") == 2  # gpu1's two slots busy with other clients
    await balancer.aclose()


async def test_a_waiter_cancelled_before_its_task_runs_is_not_granted_the_freed_slot() -> None:
    """Task.cancel() takes effect only at the task's next step: a slot released in between is granted
    to the cancelled waiter, which must hand it on to the next live waiter; the release must not fail."""
    from llamacpp_ha._request import RequestFacts

    fleet = MockFleet.of("gpu1", slots=1)
    balancer = Balancer(fleet.config(), poll_transport=fleet.transport())
    facts = RequestFacts(model=None, stream=False)
    lease = await balancer.acquire(facts)
    cancelled = asyncio.create_task(balancer.acquire(facts))
    live = asyncio.create_task(balancer.acquire(facts))
    await asyncio.sleep(0.01)
    assert balancer.snapshot().queue_depth == 2
    cancelled.cancel()  # its task has not run yet
    lease.release()  # the same instant: the freed slot must skip the cancelled waiter
    second = await asyncio.wait_for(live, 2)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert balancer.snapshot().queue_depth == 0
    second.release()
    assert balancer.snapshot().in_flight == 0
    await balancer.aclose()
