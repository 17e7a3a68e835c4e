"""The cost-aware scheduler on its own: prefix index, cost decisions, patience, weights, retries.

Backends here are polled-looking ``Backend`` objects (no HTTP); each test checks that the slot
counts return to where they were.
"""

from __future__ import annotations

import hashlib
import time

import anyio
import pytest

from llamacpp_ha import BackendConfig, BackendState, Balancer, BalancerConfig
from llamacpp_ha._leases import Lease, Timings
from llamacpp_ha._prefix import PrefixIndex
from llamacpp_ha._prompt import PromptShape, prompt_shape
from llamacpp_ha._queue import Grant, Waiter, WaiterState
from llamacpp_ha._scheduler import _jump

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


BLOCK = 512


def blocks(conversation: int, count: int) -> tuple[bytes, ...]:
    return tuple(conversation.to_bytes(4, "little") + i.to_bytes(4, "little") for i in range(count))


def prompt(conversation: int, count: int, weight: int = 1) -> PromptShape:
    return PromptShape(blocks(conversation, count), count * BLOCK + 100, weight)


def balancer(
    *slots: int, patience_max_s: float = 3.0, prefill_backlog_s: float | None = None, ram_cache_tokens: int = 65_536
) -> Balancer:
    """A balancer whose backends look polled and healthy; nothing is ever sent to them."""
    config = BalancerConfig(
        backends=[BackendConfig(url=f"http://b{i}.invalid:8080", name=f"b{i}") for i in range(len(slots))],
        patience_max_s=patience_max_s,
        prefill_backlog_s=prefill_backlog_s,
        ram_cache_tokens=ram_cache_tokens,
    )
    made = Balancer(config)
    for backend, capacity in zip(made.backends, slots, strict=True):
        backend.reported_capacity = capacity
        backend.set_models(("model.gguf",))
        backend.set_state(BackendState.HEALTHY, "ready")
        backend.prefill_rate = 1000.0  # tokens/s, known
        backend.service_s = 10.0
    made.scheduler.cost.learn_prompt(None, 1000, 250)  # 0.25 tokens per character
    return made


def waiter(made: Balancer, shape: PromptShape, *, excluded: frozenset[str] = frozenset()) -> Waiter:
    return Waiter(made.queue.next_seq(), "model", Grant(), time.monotonic(), prompt=shape, excluded=excluded)


def submit(made: Balancer, shape: PromptShape, **kwargs: frozenset[str]) -> Waiter:
    entry = waiter(made, shape, **kwargs)
    made.queue.push(entry)
    made.scheduler.dispatch()
    return entry


def granted(entry: Waiter) -> str | None:
    return entry.grant.result().backend.name if entry.grant.done() else None


def release_all(made: Balancer) -> None:
    for _ in range(100):  # a release grants the next waiter a slot: release those too
        for lease in list(made.scheduler.leases):
            lease.release()
    assert [b.in_flight for b in made.backends] == [0] * len(made.backends)
    assert len(made.queue) == 0


def prefilling(made: Balancer, backend: str, tokens: float) -> Lease:
    """Another client's prompt of ``tokens`` uncached tokens, still being processed there (60 s left)."""
    lease = Lease(made.backend(backend), lambda lease: None)
    lease.uncached_tokens, lease.predicted_prefill_s = tokens, 60.0
    made.backend(backend).leases.add(lease)
    return lease


def seed(made: Balancer, backend: str, shape: PromptShape) -> None:
    made.scheduler.index.insert(backend, shape.blocks)


# -- the prefix index ------------------------------------------------------------------------


def test_the_longest_match_is_the_held_prefix() -> None:
    index = PrefixIndex()
    index.insert("a", blocks(1, 10))
    assert index.match("a", blocks(1, 10)) == 10
    assert index.match("a", blocks(1, 25)) == 10  # a later turn: its first 10 blocks are held
    assert index.match("a", blocks(2, 10)) == 0
    assert index.match("b", blocks(1, 10)) == 0
    assert index.holders(blocks(1, 10)[9]) == {"a"}


def test_eviction_takes_the_tail_of_a_prompt_before_its_head() -> None:
    index = PrefixIndex()
    index.set_ceiling("a", 16)
    index.insert("a", blocks(1, 10))
    index.insert("a", blocks(2, 10))  # 20 blocks > 16: the oldest tails go
    assert index.size("a") == 16
    assert index.match("a", blocks(2, 10)) == 10
    assert index.match("a", blocks(1, 10)) == 6  # still a prefix of conversation 1
    assert index.holders(blocks(1, 10)[9]) == set()


def test_a_restart_empties_a_backends_index_and_misses_shrink_it() -> None:
    index = PrefixIndex()
    index.set_ceiling("a", 100)
    index.insert("a", blocks(1, 40))
    index.observe("a", expected_blocks=40, actual_blocks=2)
    assert index.limit("a") == 80
    index.clear("a")
    assert index.match("a", blocks(1, 40)) == 0
    assert index.holders(blocks(1, 40)[0]) == set()
    assert index.limit("a") == 100


def test_misses_never_shrink_the_belief_below_a_quarter_of_the_ceiling() -> None:
    # Under load many misses come from slots overwritten before we came back; a belief shrunk to a
    # few blocks would forget every prompt (it did: 16 blocks of a 10,000-block ceiling).
    index = PrefixIndex()
    index.set_ceiling("a", 1000)
    for _ in range(50):
        index.observe("a", expected_blocks=40, actual_blocks=0)
    assert index.limit("a") == 250
    index.insert("a", blocks(1, 200))
    assert index.match("a", blocks(1, 200)) == 200


def test_copies_of_a_prompt_beginning_are_counted_per_slot() -> None:
    index = PrefixIndex()
    index.set_ceiling("a", 1000)
    index.insert("a", blocks(1, 10))
    index.insert("a", blocks(1, 12), new_copy=False)  # the next turn, in the same slot
    assert index.copies("a", blocks(1, 1)[0]) == 1
    index.insert("a", blocks(1, 11))  # sent while that slot was busy: another slot holds it too
    assert index.copies("a", blocks(1, 1)[0]) == 2
    assert index.copies("b", blocks(1, 1)[0]) == 0
    index.set_ceiling("a", 16)  # the prompt's first block is evicted with the rest of it
    index.insert("a", blocks(2, 16))
    assert index.copies("a", blocks(1, 1)[0]) == 0
    assert index.copies("a", blocks(2, 1)[0]) == 1
    index.clear("a")
    assert index.copies("a", blocks(2, 1)[0]) == 0


def test_a_copy_saved_in_ram_serves_one_request_and_goes_with_the_prompts_beginning() -> None:
    index = PrefixIndex()
    index.set_ceiling("a", 1000)
    first = blocks(1, 1)[0]
    index.insert("a", blocks(1, 10))
    index.task_started("a", None, reused_copy=False)
    assert not index.saved("a", first), "only a backend with a RAM prompt cache saves it"
    index.insert("a", blocks(1, 10), new_copy=False, ram_cache=True)
    index.task_started("a", first, reused_copy=True)
    assert not index.saved("a", first), "the next task reused its slot: not idle, not saved"
    index.task_started("a", blocks(2, 1)[0], reused_copy=False)
    assert index.saved("a", first), "saved as a task started elsewhere while its slot was idle"
    assert not index.saved("b", first)
    assert index.take_saved("a", first)
    assert not index.take_saved("a", first), "loading moves the saved copy into a slot"
    index.insert("a", blocks(1, 10), new_copy=False, ram_cache=True)
    index.task_started("a", None, reused_copy=False)
    index.clear("a")
    assert not index.saved("a", first)
    index.insert("a", blocks(1, 10), ram_cache=True)
    index.task_started("a", None, reused_copy=False)
    index.set_ceiling("a", 16)
    index.insert("a", blocks(2, 16))  # evicts the first prompt, its beginning included
    assert not index.saved("a", first)


def test_a_backend_holds_one_prompt_per_slot_and_overwrites_the_least_recently_used() -> None:
    index = PrefixIndex()
    index.set_ceiling("a", 1000)  # room for every block: only the slots bound what it holds
    index.set_slots("a", 2)
    index.insert("a", blocks(1, 10))
    index.insert("a", blocks(2, 10))
    index.insert("a", blocks(1, 12), new_copy=False)  # the first conversation's next turn, in its slot
    index.insert("a", blocks(3, 10))  # a third prompt takes the least recently used slot: the second's
    assert index.match("a", blocks(2, 10)) == 0
    assert "a" not in index.holders(blocks(2, 1)[0])
    assert index.copies("a", blocks(2, 1)[0]) == 0
    assert index.match("a", blocks(1, 12)) == 12
    assert index.match("a", blocks(3, 10)) == 10
    index.untracked_prompt("a")  # a prompt shorter than a block takes a slot too: the first's
    assert index.match("a", blocks(1, 12)) == 0
    assert index.match("a", blocks(3, 10)) == 10


def test_a_task_taking_a_slot_overwrites_an_idle_one_never_one_in_use() -> None:
    index = PrefixIndex()
    index.set_ceiling("a", 1000)
    index.set_slots("a", 3)
    first, second, third = (blocks(n, 1)[0] for n in (1, 2, 3))
    for n in (1, 2, 3):
        index.insert("a", blocks(n, 10))
    # A request reuses the first prompt's slot: it is processing, and the most recently used.
    index.task_started("a", first, reused_copy=True, taking=0, in_use=lambda block: int(block == first))
    # Two tasks take slots that do not hold their prompts: the idle ones go, least recent first.
    index.task_started("a", None, reused_copy=False, taking=1, in_use=lambda block: int(block == first))
    assert (index.copies("a", first), index.copies("a", second), index.copies("a", third)) == (1, 0, 1)
    index.task_started("a", None, reused_copy=False, taking=2, in_use=lambda block: 1)
    assert index.copies("a", third) == 1, "every prompt left is in use: no slot of theirs is taken"
    index.task_started("a", None, reused_copy=False, taking=2, in_use=lambda block: int(block == first))
    assert (index.match("a", blocks(1, 10)), index.match("a", blocks(3, 10))) == (10, 0)
    index.clear("a")
    assert index.copies("a", first) == 0


def test_with_a_ram_cache_a_prompt_overwritten_in_its_slot_is_saved_there() -> None:
    index = PrefixIndex()
    index.set_ceiling("a", 1000)
    index.set_slots("a", 1)
    first = blocks(1, 1)[0]
    index.insert("a", blocks(1, 10), ram_cache=True)
    index.task_started("a", blocks(2, 1)[0], reused_copy=False, taking=1, in_use=lambda block: 0, ram_cache=True)
    assert index.copies("a", first) == 0
    assert index.saved("a", first)
    assert index.match("a", blocks(1, 10)) == 10, "the RAM cache holds it"
    index.insert("a", blocks(2, 10), ram_cache=True)
    assert index.take_saved("a", first)
    index.untracked_prompt("a", ram_cache=True)  # a prompt shorter than a block overwrites it too
    assert index.saved("a", blocks(2, 1)[0])
    assert index.match("a", blocks(2, 10)) == 10


def test_homes_spread_evenly_and_a_backend_added_takes_keys_from_the_others_only() -> None:
    keys = [
        int.from_bytes(hashlib.blake2b(i.to_bytes(4, "little"), digest_size=8).digest(), "little")
        for i in range(20_000)
    ]
    before = [_jump(key, 10) for key in keys]
    counts = [before.count(bucket) for bucket in range(10)]
    assert min(counts) > 0.9 * 2_000
    assert max(counts) < 1.1 * 2_000
    after = [_jump(key, 11) for key in keys]
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert all(new == 10 for _, new in moved)  # only to the new backend
    assert 0.8 * 20_000 / 11 < len(moved) < 1.2 * 20_000 / 11


def test_prompts_cached_nowhere_have_homes_on_every_backend() -> None:
    made = balancer(*[1] * 8)
    homes = {made.scheduler._home_of(prompt(conversation, 1).blocks[0], "model").name for conversation in range(400)}
    assert homes == {backend.name for backend in made.backends}


def test_in_a_fleet_of_two_models_a_prompts_home_serves_its_model() -> None:
    made = balancer(*[1] * 8)
    for backend in made.backends[:3]:
        backend.set_models(("other.gguf",))
    made.scheduler.backends_changed()

    def homes(model: str) -> set[str]:
        return {made.scheduler._home_of(prompt(c, 1).blocks[0], model).name for c in range(400)}

    assert homes("other") == {"b0", "b1", "b2"}
    assert homes("model") == {"b3", "b4", "b5", "b6", "b7"}
    made.backend("b7").set_models(("other.gguf",))  # a poll finds it serves the other model now
    made.scheduler.backends_changed()
    assert homes("other") == {"b0", "b1", "b2", "b7"}
    assert homes("model") == {"b3", "b4", "b5", "b6"}


def test_timings_are_read_from_the_tail_of_a_body() -> None:
    tail = b'data: {"choices":[],"timings":{"cache_n":51,"prompt_n":1,"prompt_ms":1.224,"predicted_n":12}}\n\n'
    assert Timings.find(tail) == Timings(51, 1, 1.224, predicted_n=12)
    assert Timings.find(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n') is None


# -- the cost decision -----------------------------------------------------------------------


async def test_the_backend_holding_the_prefix_wins_when_its_slot_is_free() -> None:
    made = balancer(2, 2)
    shape = prompt(1, 40)
    seed(made, "b1", shape)
    entry = submit(made, shape)
    assert granted(entry) == "b1"
    lease = entry.grant.result()
    assert lease.affinity == "hit"
    assert lease.expected_cached_tokens == pytest.approx(40 * BLOCK * 0.25)
    release_all(made)


async def test_short_conversations_sharing_a_system_prompt_find_their_backends_by_end_marks() -> None:
    # Every backend holds the shared system prompt's blocks; each conversation's own turns end
    # inside the next block. Only the end marks tell the backends apart.
    made = balancer(2, 2)
    system = "Rules. " * 150

    def turn(conversation: int, turns: int) -> PromptShape:
        messages = [{"role": "system", "content": system}]
        for i in range(turns):
            messages += [
                {"role": "user", "content": f"Trip {conversation}, question {i}"},
                {"role": "assistant", "content": f"Answer {i}"},
            ]
        return prompt_shape("chat", {"messages": messages[:-1]}, "model", BLOCK, 2048)

    for conversation in range(6):
        first = turn(conversation, 1)
        assert first.end is not None
        made.scheduler.index.insert(f"b{conversation % 2}", first.blocks, first.end)
    entries = [submit(made, turn(conversation, 2)) for conversation in range(4)]
    assert [granted(entry) for entry in entries] == ["b0", "b1", "b0", "b1"]
    assert all(entry.grant.result().affinity == "hit" for entry in entries)
    release_all(made)


async def test_a_free_backend_wins_when_the_one_with_the_prefix_is_buried_in_prefill() -> None:
    made = balancer(4, 4)
    shape = prompt(1, 8)  # 1,049 tokens, 1,024 of them cached on b1
    seed(made, "b1", shape)
    # Other clients' long cold prompts are prefilling on b1: 60,000 tokens at 1,000 tokens/s.
    other = prefilling(made, "b1", 60_000.0)
    entry = submit(made, shape)
    assert granted(entry) == "b0"
    assert entry.grant.result().affinity == "miss"
    other.backend.leases.discard(other)
    release_all(made)


async def test_a_cold_prompt_is_priced_with_the_prompts_it_delays() -> None:
    # llama-server batches the prompts it processes, so a cold 5,000-token prompt slows each of the
    # four prompts already prefilling on b0 by about 5 s. Its own first token would come sooner there
    # (9 s) than behind b1's longer backlog (20 s), where it is cached; counting the delay it causes
    # the others, b1 wins.
    made = balancer(8, 8)
    shape = prompt(1, 40)  # 5,145 tokens, 5,120 of them cached on b1
    seed(made, "b1", shape)
    others = [prefilling(made, name, tokens) for name, tokens in (("b0", 1_000.0), ("b1", 5_000.0)) for _ in range(4)]
    entry = submit(made, shape)
    assert granted(entry) == "b1"
    assert entry.grant.result().affinity == "hit"
    for lease in others:
        lease.backend.leases.discard(lease)
    release_all(made)


@pytest.mark.parametrize(("queued", "chosen"), [(0, "b0"), (10, "b1")])
async def test_requests_waiting_here_make_a_cold_prefill_cost_more(queued: int, chosen: str) -> None:
    # b1 holds the prompt behind 4 s of other prefill; b0 is idle and would process it in 1 s. Alone,
    # b0 answers sooner. With ten requests waiting here for the fleet, five per backend go after
    # whatever it processes: its second of cold prefill costs them five seconds, and b1 wins.
    made = balancer(4, 4)
    shape = prompt(1, 8)  # 1,049 tokens, 1,024 of them cached on b1
    seed(made, "b1", shape)
    backlog = prefilling(made, "b1", 4_000.0)
    others = [Waiter(made.queue.next_seq(), "unserved", Grant(), time.monotonic()) for _ in range(queued)]
    for other in others:
        made.queue.push(other)
    entry = submit(made, shape)
    assert granted(entry) == chosen
    backlog.backend.leases.discard(backlog)
    for other in others:
        made.queue.forget(other)
    release_all(made)


async def test_a_heterogeneous_fleet_sends_new_prompts_to_the_faster_backend() -> None:
    made = balancer(2, 2)
    made.backend("b0").prefill_rate = 500.0  # half as fast
    for i in range(3):
        entry = submit(made, prompt(i, 20))
        assert granted(entry) == "b1"
        entry.grant.result().release()
    release_all(made)


async def test_a_backend_busy_prefilling_takes_no_new_request_until_its_backlog_is_short() -> None:
    made = balancer(4, 4, prefill_backlog_s=0.5)
    long = [submit(made, prompt(i, 40)) for i in range(2)]  # 5,100 tokens each: 5 s of prefill
    assert sorted(granted(e) or "" for e in long) == ["b0", "b1"]
    waiting = submit(made, prompt(9, 4))
    assert not waiting.grant.done()  # free slots, but both backends have seconds of prefill queued
    lease = long[0].grant.result()
    lease.touch()  # its first token: the prompt is processed, the backend takes the next request
    assert granted(waiting) == lease.backend.name
    release_all(made)


async def test_a_short_request_is_not_held_back_by_a_backlog_of_long_prompts() -> None:
    made = balancer(4, 4, prefill_backlog_s=0.5)
    long = [submit(made, prompt(i, 40)) for i in range(2)]  # 5 s of prefill on each backend
    assert sorted(granted(e) or "" for e in long) == ["b0", "b1"]
    medium = submit(made, prompt(8, 4))  # 537 tokens: 0.54 s, longer than a tenth of the backlog limit
    made.scheduler.queued(medium)  # what the balancer does when a request finds no free slot
    short = submit(made, PromptShape((), 120, 1))  # 30 tokens: 30 ms, processed beside the long ones
    made.scheduler.queued(short)
    assert granted(short) in ("b0", "b1")
    assert short.grant.result().expected_cached_tokens == 0
    assert not medium.grant.done()
    release_all(made)


async def test_a_request_that_waited_for_its_copy_is_not_held_back_by_a_backlog() -> None:
    made = balancer(4, 4, patience_max_s=20.0, prefill_backlog_s=2.0)
    shape = prompt(1, 40)
    seed(made, "b0", shape)
    first = submit(made, shape)
    assert granted(first) == "b0"
    other = prefilling(made, "b0", 5_000)  # another client's 5 s prompt closes b0 to new requests
    made.backend("b0").service_s = 1.0  # the first ends soon
    second = submit(made, prompt(1, 41))  # the same beginning while the first runs: it waits for it
    assert second.parked_on == "b0"
    first.grant.result().release()
    # b0 is still closed, but all of the second's prompt is cached there but 153 tokens (0.15 s).
    assert granted(second) == "b0"
    assert second.grant.result().expected_cached_tokens == 5_120
    made.backend("b0").leases.discard(other)
    release_all(made)


async def test_a_backend_closed_twice_until_the_same_deadline_stays_closed_then_reopens() -> None:
    made = balancer(8, prefill_backlog_s=6.0)
    done = submit(made, prompt(9, 4))
    done.grant.result().touch()  # answering already: no prefill left
    short = submit(made, prompt(1, 4))  # 0.6 s of prefill: the earliest deadline
    long = submit(made, prompt(2, 60))  # 7.7 s: the backlog is past 6 s
    assert granted(short) == granted(long) == "b0"
    waiting = submit(made, prompt(3, 4))
    assert not waiting.grant.done()
    done.grant.result().release()  # reopens it; still past its backlog, closed until the same deadline
    assert not waiting.grant.done()
    long.grant.result().touch()  # its prompt is processed: the backlog is short again
    assert granted(waiting) == "b0"
    release_all(made)


async def test_with_many_backends_free_the_one_holding_the_prompt_is_still_priced() -> None:
    # Past 16 free backends a decision prices the holders and the 16 least loaded, not all.
    made = balancer(*[4] * 24)
    holder = made.backend("b23")
    running = Lease(holder, lambda lease: None)  # the holder is the most loaded backend
    holder.leases.add(running)
    holder.in_flight += 1
    shape = prompt(1, 40)
    seed(made, "b23", shape)
    entry = submit(made, shape)
    assert granted(entry) == "b23"
    assert entry.grant.result().affinity == "hit"
    holder.leases.discard(running)
    holder.in_flight -= 1
    release_all(made)


async def test_with_many_backends_free_a_model_served_by_one_of_them_finds_it() -> None:
    made = balancer(*[4] * 24)
    only = made.backend("b23")
    only.set_models(("other.gguf",))
    entry = Waiter(made.queue.next_seq(), "other", Grant(), time.monotonic(), prompt=prompt(1, 4))
    made.queue.push(entry)
    made.scheduler.dispatch()
    assert granted(entry) == "b23"
    release_all(made)


# -- bounded patience ------------------------------------------------------------------------


async def test_a_request_waits_for_the_busy_backend_holding_its_long_prefix() -> None:
    made = balancer(1, 1)
    shape = prompt(1, 200)  # 25,600 tokens: 25.6 s of prefill anywhere else
    holder = submit(made, prompt(3, 1))
    home = granted(holder)
    assert home is not None
    made.backend(home).service_s = 0.5  # its slot frees soon
    seed(made, home, shape)
    entry = submit(made, shape)  # the other backend is free, but would prefill it all
    assert entry.state is WaiterState.PARKED
    assert entry.parked_on == home
    await anyio.sleep(0.01)
    holder.grant.result().release()  # the slot frees: it picks the parked request
    assert granted(entry) == home
    assert entry.grant.result().affinity == "hit"
    # The operator sees the wait for a cache, and what it was predicted to take.
    counters = made.snapshot().counters
    assert counters.parked == 1
    assert 0.01 <= counters.parked_wait_s < 5
    assert counters.parked_wait_predicted_s == pytest.approx(0.5)  # one slot, nobody ahead of it
    assert counters.patience_ran_out == 0
    release_all(made)


async def test_a_request_does_not_wait_for_a_prefix_two_busy_backends_hold() -> None:
    # A common beginning (a tenant's system prompt): lining its requests up behind one of its
    # holders makes the tail. The free backend serves it, though it must prefill it all.
    made = balancer(1, 1, 1)
    holders = [submit(made, prompt(3 + i, 1), excluded=frozenset({"b0", "b1", "b2"} - {name})) for i, name in
               enumerate(("b0", "b1"))]  # fmt: skip
    assert [granted(h) for h in holders] == ["b0", "b1"]
    shape = prompt(1, 200)
    for name in ("b0", "b1"):
        made.backend(name).service_s = 0.5  # their slots free soon
        seed(made, name, shape)
    entry = submit(made, shape)
    assert granted(entry) == "b2"
    assert made.snapshot().counters.parked == 0
    release_all(made)


async def test_with_many_backends_free_a_freed_slot_still_picks_the_request_parked_for_it() -> None:
    # With more backends free than have parked requests, a dispatch looks only at the latter.
    made = balancer(*[4] * 23, 1)
    fillers = [submit(made, prompt(100 + i, 1)) for i in range(24)]  # a slot of each backend
    holder = next(f for f in fillers if granted(f) == "b23")
    made.backend("b23").service_s = 0.5
    shape = prompt(1, 200)  # 25,600 tokens: 25.6 s of prefill on any of the 23 free backends
    seed(made, "b23", shape)
    entry = submit(made, shape)
    assert entry.parked_on == "b23"
    holder.grant.result().release()
    assert granted(entry) == "b23"
    assert entry.grant.result().affinity == "hit"
    release_all(made)


async def test_a_request_arriving_at_a_large_full_fleet_still_waits_for_the_backend_with_its_prefix() -> None:
    # Arriving with every slot busy, a request is priced cold on a sample of the fleet turning with
    # each arrival (an arrival cost O(backends) before), and still parks for its prefix's backend.
    made = balancer(*[1] * 40)
    for backend in made.backends[:10]:
        backend.set_models(("other.gguf",))
    fillers = [submit(made, prompt(100 + i, 1)) for i in range(30)]
    for i in range(10):
        other = Waiter(made.queue.next_seq(), "other", Grant(), time.monotonic(), prompt=prompt(200 + i, 1))
        made.queue.push(other)
        made.scheduler.dispatch()
        fillers.append(other)
    for filler in fillers:
        filler.grant.result().touch()  # answering: nothing left to prefill
    assert not made.scheduler._with_free_slots
    made.backend("b39").service_s = 0.5
    shape = prompt(1, 200)  # 25.6 s of prefill anywhere else
    seed(made, "b39", shape)
    entry = waiter(made, shape)
    made.queue.push(entry)  # as Balancer.acquire queues a request
    made.scheduler.dispatch()
    made.scheduler.queued(entry)
    assert entry.parked_on == "b39"
    samples = [made.scheduler._cold_sample(entry) for _ in range(3)]
    assert all(len(sample) == 16 for sample in samples)
    assert all(backend.serves("model") for sample in samples for backend in sample)
    assert len({backend.name for sample in samples for backend in sample}) == 30, "the sample turns over the fleet"
    next(f for f in fillers if granted(f) == "b39").grant.result().release()
    assert granted(entry) == "b39"
    release_all(made)


async def test_a_wait_predicted_longer_than_the_patience_cap_is_not_begun() -> None:
    made = balancer(1, 1, patience_max_s=3.0)
    shape = prompt(1, 200)  # 25.6 s of prefill anywhere else: waiting would save a lot
    holder = submit(made, prompt(3, 1))
    home = granted(holder)
    assert home is not None
    made.backend(home).service_s = 10.0  # but its one slot frees only in about 10 s
    seed(made, home, shape)
    entry = submit(made, shape)
    assert entry.state is WaiterState.DONE, "patience would run out first: it takes the free slot now"
    assert granted(entry) != home
    release_all(made)


@pytest.mark.parametrize(("slots", "waits"), [(2, False), (48, True)])
async def test_a_wait_for_one_of_few_slots_must_save_several_times_its_length(slots: int, waits: bool) -> None:
    # Waiting saves twice its predicted length. With 2 slots a wait overruns its prediction by far
    # whenever a long request holds one: the free backend serves it now. With 48, one frees soon.
    made = balancer(slots, slots, patience_max_s=20.0)
    fillers = [submit(made, prompt(10 + i, 1), excluded=frozenset({"b1"})) for i in range(slots)]
    assert all(granted(f) == "b0" for f in fillers)
    for filler in fillers:
        filler.grant.result().touch()  # answering already: no prefill left
    shape = prompt(1, 40)  # 5,145 tokens, 5,120 of them held on b0: 10.2 s saved, counting the delay to others
    seed(made, "b0", shape)
    made.backend("b0").service_s = 5.1 * slots  # a slot frees in about 5.1 s
    entry = submit(made, shape)
    if waits:
        assert entry.parked_on == "b0"
        assert entry.predicted_wait_s == pytest.approx(5.1)
    else:
        assert granted(entry) == "b1"
    release_all(made)


async def test_a_copy_in_use_is_not_a_cache_hit_the_request_waits_for_it() -> None:
    # llama-server caches per slot: while one request with the prefix runs in the slot holding it,
    # a second one sent there fills another slot and processes it all. It waits for the first.
    made = balancer(4, 4, patience_max_s=20.0)
    shape = prompt(1, 40)  # 5,145 tokens, 5,120 of them cached on b1
    seed(made, "b1", shape)
    made.backend("b1").service_s = 2.0  # the first ends soon
    first = submit(made, shape)
    assert granted(first) == "b1"
    assert first.grant.result().expected_cached_tokens == 5_120
    second = submit(made, prompt(1, 41))  # the same beginning, while the first runs
    assert second.state is WaiterState.PARKED, "b1's only copy is in use: it waits for the first"
    assert second.parked_on == "b1"
    first.grant.result().release()
    assert granted(second) == "b1"
    lease = second.grant.result()
    assert lease.expected_cached_tokens == 5_120
    assert not lease.new_copy
    release_all(made)


async def test_without_patience_a_second_request_for_a_busy_copy_is_cold() -> None:
    made = balancer(4, 4, patience_max_s=0.0)
    shape = prompt(1, 40)
    seed(made, "b1", shape)
    first = submit(made, shape)
    second = submit(made, shape)
    assert granted(first) == "b1"
    assert second.grant.done()
    lease = second.grant.result()
    assert lease.expected_cached_tokens == 0, "b1's copy is in use: it is priced cold everywhere"
    assert lease.new_copy
    release_all(made)
    # Each slot that processed it holds it now: two requests with it at once both hit.
    copies = {name: made.scheduler.index.copies(name, shape.blocks[0]) for name in ("b0", "b1")}
    assert sum(copies.values()) == 2
    assert copies["b1"] >= 1


@pytest.mark.parametrize("ram_cache_tokens", [65_536, 0])
async def test_with_a_ram_prompt_cache_a_second_request_loads_the_saved_copy(ram_cache_tokens: int) -> None:
    # llama-server saves an idle slot's prompt to its RAM cache as a task starts in another slot;
    # a request that then finds the slot copy in use loads the saved one into a slot of its own.
    made = balancer(4, 4, patience_max_s=20.0, ram_cache_tokens=ram_cache_tokens)
    earlier = submit(made, prompt(1, 40))
    home = granted(earlier)
    assert home is not None
    earlier.grant.result().release()
    other = submit(made, prompt(2, 40))
    if granted(other) != home:  # a task must start on the home backend while the slot is idle
        other.grant.result().release()
        other = submit(made, prompt(3, 2), excluded=frozenset({"b0", "b1"} - {home}))
    assert granted(other) == home
    first = submit(made, prompt(1, 41))
    assert granted(first) == home
    assert not first.grant.result().new_copy, "it reuses the slot the earlier request left"
    second = submit(made, prompt(1, 42))  # the same beginning, while the first runs
    if ram_cache_tokens:
        assert granted(second) == home
        lease = second.grant.result()
        assert lease.expected_cached_tokens == 5_120
        assert lease.new_copy, "it fills another slot"
        third = submit(made, prompt(1, 43))
        # The saved copy went with the second request: the third waits for a copy or goes cold.
        assert third.state is WaiterState.PARKED or third.grant.result().expected_cached_tokens == 0
    else:
        # --cache-ram 0: the only copy is in use; it waits for it or goes cold.
        assert second.state is WaiterState.PARKED or second.grant.result().expected_cached_tokens == 0
    release_all(made)
    assert made.scheduler.index.copies(home, prompt(1, 1).blocks[0]) >= (2 if ram_cache_tokens else 1)


async def test_a_slot_reused_at_once_is_never_saved_to_ram_so_the_next_request_waits() -> None:
    made = balancer(4, 4, patience_max_s=20.0)
    earlier = submit(made, prompt(1, 40))
    home = granted(earlier)
    earlier.grant.result().release()
    first = submit(made, prompt(1, 41))  # takes the idle slot before any other task starts there
    assert granted(first) == home
    assert home is not None
    made.backend(home).service_s = 2.0  # the first ends soon
    second = submit(made, prompt(1, 42))
    assert second.state is WaiterState.PARKED, "no copy in RAM: it waits for the first"
    release_all(made)


async def test_two_requests_parked_for_one_copy_are_served_one_after_the_other() -> None:
    made = balancer(2, 1, patience_max_s=60.0)
    made.backend("b0").service_s = 0.5
    fillers = [submit(made, prompt(10 + i, 1)) for i in range(3)]  # both backends full
    assert sorted(granted(f) or "" for f in fillers) == ["b0", "b0", "b1"]
    shape = prompt(1, 200)  # 25,600 tokens: b0 holds it once
    seed(made, "b0", shape)
    waiting = [submit(made, shape) for _ in range(2)]
    for entry in waiting:
        made.scheduler.queued(entry)  # what the balancer does when a request finds no free slot
    assert [w.parked_on for w in waiting] == ["b0", "b0"]
    on_b0 = [f.grant.result() for f in fillers if granted(f) == "b0"]
    on_b0[0].release()
    first = next(w for w in waiting if w.grant.done())
    assert first.grant.result().expected_cached_tokens > 25_000
    on_b0[1].release()  # a second slot frees, but the copy is in use: the other waits for it
    second = next(w for w in waiting if w is not first)
    assert second.state is WaiterState.PARKED
    first.grant.result().release()
    assert granted(second) == "b0"
    assert second.grant.result().expected_cached_tokens > 25_000
    release_all(made)


async def test_of_requests_parked_for_one_copy_the_oldest_goes_first() -> None:
    # Both save the same prompt; the younger was priced while a longer queue waited behind it, so
    # its saving in seconds looks larger. The older one, whose patience ends first, goes first.
    made = balancer(2, 1, patience_max_s=60.0)
    made.backend("b0").service_s = 0.5
    fillers = [submit(made, prompt(10 + i, 1)) for i in range(3)]  # both backends full
    shape = prompt(1, 200)
    seed(made, "b0", shape)
    older = submit(made, shape)
    made.scheduler.queued(older)
    others = [submit(made, prompt(20 + i, 4)) for i in range(10)]  # cached nowhere: in arrival order
    younger = submit(made, shape)
    made.scheduler.queued(younger)
    assert [older.parked_on, younger.parked_on] == ["b0", "b0"]
    next(f for f in fillers if granted(f) == "b0").grant.result().release()
    assert granted(older) == "b0"
    assert younger.state is WaiterState.PARKED
    assert not any(entry.grant.done() for entry in others)
    release_all(made)


async def test_patience_ends_and_a_free_slot_elsewhere_serves_the_request() -> None:
    made = balancer(1, 1, patience_max_s=0.2)
    shape = prompt(1, 200)
    holder = submit(made, prompt(3, 1))
    home = granted(holder)
    assert home is not None
    made.backend(home).service_s = 0.1  # predicted to free within the patience; it never does
    seed(made, home, shape)
    entry = submit(made, shape)
    assert entry.state is WaiterState.PARKED
    started = time.monotonic()
    async with anyio.create_task_group() as group:
        group.start_soon(made.scheduler.alarm.run)  # the balancer's background task runs it
        with anyio.fail_after(2):
            await entry.grant.wait()  # the holder never finishes
        group.cancel_scope.cancel()
    assert granted(entry) != home
    assert 0.15 <= time.monotonic() - started < 1.5
    counters = made.snapshot().counters
    assert (counters.parked, counters.patience_ran_out) == (1, 1)
    assert counters.parked_wait_s >= 0.15  # it waited its patience, far past the 0.1 s predicted
    assert counters.parked_wait_predicted_s == pytest.approx(0.1)
    release_all(made)


async def test_parked_requests_go_first_but_never_past_an_overdue_one() -> None:
    # b1 holds a hot prefix; b0 always has a free slot, so hot requests park for b1. An old
    # request that may only use b1 (a retry that must avoid b0) must still get b1 once it has
    # waited patience_max_s, however many hot requests keep arriving.
    made = balancer(2, 1, patience_max_s=0.1)
    made.backend("b1").service_s = 0.01
    hot = prompt(1, 200)
    seed(made, "b1", hot)
    current = submit(made, hot)
    assert granted(current) == "b1"
    old = submit(made, prompt(2, 4), excluded=frozenset({"b0"}))
    hot_served_before_old = 0
    deadline = time.monotonic() + 2
    while not old.grant.done() and time.monotonic() < deadline:
        newcomer = submit(made, hot)
        assert newcomer.state is WaiterState.PARKED, "a hot request waits for b1 rather than take b0"
        current.grant.result().release()
        if newcomer.grant.done():
            hot_served_before_old += 1
            current = newcomer
        await anyio.sleep(0.01)
    assert granted(old) == "b1"
    assert hot_served_before_old >= 1
    assert time.monotonic() - old.enqueued_at < 0.5
    for entry in made.queue.drain():
        entry.grant.abandon()
    release_all(made)


# -- weights and retries ---------------------------------------------------------------------


async def test_a_request_with_n_choices_takes_n_slots() -> None:
    made = balancer(4)
    heavy = submit(made, prompt(1, 2, weight=3))
    assert made.backend("b0").in_flight == 3
    light = submit(made, prompt(2, 2))
    too_heavy = submit(made, prompt(3, 2, weight=2))  # one slot left: waits
    assert granted(light) == "b0"
    assert not too_heavy.grant.done()
    heavy.grant.result().release()
    assert granted(too_heavy) == "b0"
    assert made.backend("b0").in_flight == 3
    light.grant.result().release()
    release_all(made)


async def test_a_weight_beyond_every_backend_takes_a_whole_backend() -> None:
    made = balancer(2)
    entry = submit(made, prompt(1, 2, weight=8))
    assert granted(entry) == "b0"
    assert entry.grant.result().weight == 2
    release_all(made)


async def test_a_retry_that_must_avoid_the_free_backend_blocks_nobody() -> None:
    made = balancer(1, 1)
    busy = submit(made, prompt(9, 1))
    taken = granted(busy)
    other = "b1" if taken == "b0" else "b0"
    retry = submit(made, prompt(1, 1), excluded=frozenset({other}))  # may only use the busy backend
    behind = submit(made, prompt(2, 1))
    assert granted(behind) == other
    assert not retry.grant.done()
    busy.grant.result().release()
    assert granted(retry) == taken
    release_all(made)


async def test_refused_and_cancelled_waiters_do_not_pile_up_in_memory() -> None:
    made = balancer(1)
    holder = submit(made, prompt(1, 1))
    live = submit(made, prompt(2, 1))
    for i in range(5_000):
        entry = submit(made, prompt(3 + i, 1))
        entry.grant.abandon()
        made.queue.forget(entry)
    assert len(made.queue) == 1
    assert made.queue.entries() < 200
    holder.grant.result().release()
    assert granted(live) == "b0"
    made.queue.forget(live)  # granted already: forgetting it again changes nothing
    assert len(made.queue) == 0
    release_all(made)


def test_draining_then_forgetting_never_goes_negative() -> None:
    made = balancer(1)
    entry = Waiter(made.queue.next_seq(), "model", Grant(), time.monotonic())
    made.queue.push(entry)
    assert made.queue.drain() == [entry]
    made.queue.forget(entry)  # aclose() raced a cancellation
    assert len(made.queue) == 0
