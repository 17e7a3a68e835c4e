"""Several balancers, one fleet: slot leases, the prefix index and pins shared through Redis.

Each balancer still decides locally (the scheduler is synchronous and stays so); a slot it
grants is then confirmed in Redis by one atomic script that admits the lease only while the
backend's leases from every balancer fit its capacity. A refused grant goes back to the queue,
and the backend counts as full until a release anywhere frees a slot. Leases carry a TTL that
their holder renews, so the slots of a balancer that died come back within ``lease_ttl_s``.

What one balancer learns (a prompt now cached on a backend, a session pinned to one) is
published on a channel; every other balancer applies it to its own index, so a conversation's
next turn finds its backend whichever balancer it reaches.

Every process keeps polling every backend itself: nothing shared can then stop a balancer from
seeing its fleet, and polls are cheap next to inference. When Redis does not answer within
``timeout_s``, admission falls back to local counting (availability over exactness), with a
warning, a counter and a ``/health`` detail, and shared mode resumes once Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import sniffio

from ._backend import Backend, redact_url
from ._config import SharedConfig
from ._leases import Lease
from ._scripts import ACQUIRE, COUNT, RELEASE, RENEW, WAIT
from ._snapshot import SharedSnapshot, SharedState

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from ._affinity import AffinityTable
    from ._prefix import PrefixIndex

__all__ = ["ORDER_GRACE_S", "Admission", "SharedFleet", "Ticket"]

Admission = Literal["admitted", "full", "deferred"]

ORDER_GRACE_S = 0.1
"""How long a request leaves freed slots to older waiters of other balancers; then it takes one
after all (the older one may be waiting for another backend, by choice)."""

logger = logging.getLogger("llamacpp_ha")


@dataclass(slots=True)
class Ticket:
    """A request's place in the fleet-wide line for its model."""

    member: str
    arrival_ms: int
    line: str
    """The Redis key of its model's line."""
    registered: bool = False


class SharedFleet:
    """One balancer's seat in a fleet shared through Redis."""

    def __init__(
        self,
        config: SharedConfig,
        backends: Sequence[Backend],
        index: PrefixIndex,
        affinity: AffinityTable,
        on_change: Callable[[], None],
        wait_expiry_s: float = 600.0,
    ) -> None:
        try:
            # Imported now, not in the first request's path (a cold import takes a while).
            import redis.asyncio  # noqa: F401
        except ImportError:
            raise ImportError(
                "shared mode needs redis-py: pip install 'llamacpp-ha[redis]' (or remove [shared])"
            ) from None
        self.config = config
        self._backends = {backend.name: backend for backend in backends}
        self._index = index
        self._affinity = affinity
        self._on_change = on_change
        self._wait_expiry_s = wait_expiry_s
        """A line nobody joined for this long is deleted (the longest a request waits, and more)."""
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.state: SharedState = "connecting"
        self.reason = "not connected yet"
        self.fallbacks = 0
        self.refused = 0
        self.replicas: list[str] = []
        self._ns = config.namespace
        self._channel = f"{self._ns}:events"
        self._replicas_key = f"{self._ns}:replicas"
        self._ttl_ms = int(config.lease_ttl_s * 1000)
        self._ids = itertools.count()
        self._held: dict[str, Lease] = {}
        """Our leases Redis admitted, by member."""
        self.deferred = 0
        self.order_grace_s = ORDER_GRACE_S
        self._claimed_elsewhere: set[str] = set()
        """Backends with a free slot we left to an older waiter of another balancer."""
        self._outbox: list[tuple[str, Any]] = []
        self._outbox_ready = asyncio.Event()
        self._sending = asyncio.Event()
        """Clear while the background sender's batch is on the wire."""
        self._sending.set()
        self._client: Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._connected = asyncio.Event()

    # -- keys --------------------------------------------------------------------------------

    def _leases_key(self, backend: str) -> str:
        return f"{self._ns}:leases:{backend}"

    def _line_key(self, model: str | None) -> str:
        return f"{self._ns}:waiting:{model or '*'}"

    def ticket(self, seq: int, model: str | None) -> Ticket:
        """A request's place in the fleet-wide line: its arrival by the wall clock (balancers on
        several hosts need clocks kept in step, as NTP does, for the order to hold)."""
        return Ticket(f"{self.replica}|{seq}", int(time.time() * 1000), self._line_key(model))

    def waiting(self, ticket: Ticket) -> None:
        """The request waits: balancers with younger requests leave freed slots to it."""
        if self.state == "shared" and not ticket.registered:
            ticket.registered = True
            self._send("wait", ticket)

    def done_waiting(self, ticket: Ticket) -> None:
        if ticket.registered:
            ticket.registered = False
            if self.state == "shared":
                self._send("unwait", ticket)

    # -- lifecycle -----------------------------------------------------------------------------

    @staticmethod
    def check_event_loop() -> None:
        """redis-py's async client runs on asyncio only: say so, rather than fail somewhere inside it."""
        library = sniffio.current_async_library()
        if library != "asyncio":
            raise RuntimeError(f"Shared mode (config.shared) runs under asyncio only, not under {library}.")

    async def start(self) -> None:
        """Connect in the background and wait for the first attempt's outcome: until then, no
        request is admitted (admitting locally would overfill backends other balancers use).
        Each step of the attempt has ``timeout_s``; the wait is bounded all the same."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="llamacpp-ha-shared")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5 + 10 * self.config.timeout_s):
                await self._connected.wait()

    async def aclose(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None and self.state == "shared":
            # Give back what we still hold, so peers need not wait for the TTL.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.config.timeout_s):
                    async with self._client.pipeline(transaction=False) as pipe:
                        for member, lease in self._held.items():
                            pipe.zrem(self._leases_key(lease.backend.name), member)
                        pipe.zrem(self._replicas_key, self.replica)
                        await pipe.execute()
        self._held.clear()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        from redis.exceptions import RedisError

        # Not "while True": in Python 3.11 a TaskGroup whose child fails as the task is cancelled
        # raises the child's error and drops the cancel, which the handlers below would absorb,
        # and aclose() would wait for this loop forever (seen once in CI, in a test's teardown).
        while not self._closing:
            try:
                await self._connect()
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._listen())
                    group.create_task(self._renew_forever())
                    group.create_task(self._drain_outbox())
            except* (RedisError, OSError, TimeoutError) as failure:
                self._fall_back(failure.exceptions[0])
            except* Exception as failure:  # a bug must not leave admission waiting on us
                logger.error("shared mode failed", exc_info=failure.exceptions[0])
                self._fall_back(failure.exceptions[0])
            if not self._closing:
                await asyncio.sleep(self.config.retry_interval_s)

    async def _connect(self) -> None:
        from redis.asyncio import Redis

        if self._client is None:
            timeout = self.config.timeout_s
            self._client = Redis.from_url(
                self.config.url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=None
            )
        async with asyncio.timeout(self.config.timeout_s):
            await self._client.ping()
        self._acquire_script = self._client.register_script(ACQUIRE)
        self._release_script = self._client.register_script(RELEASE)
        self._count_script = self._client.register_script(COUNT)
        self._renew_script = self._client.register_script(RENEW)
        self._wait_script = self._client.register_script(WAIT)
        self._answering()

    def _answering(self) -> None:
        """Redis answered: admission is shared (again, after a fallback)."""
        if self.state == "local":
            logger.warning("shared mode: Redis at %s answers again; admission is shared", self._display_url)
        self.state, self.reason = "shared", "Redis answers"

    def _fall_back(self, error: BaseException) -> None:
        if self.state != "local":
            self.fallbacks += 1
            logger.warning(
                "shared mode: Redis at %s is unreachable (%s); admitting requests locally until it answers",
                self._display_url,
                type(error).__name__,
            )
        self.state = "local"
        self.reason = f"Redis unreachable: {type(error).__name__}: {error}"[:300]
        # Our admitted leases may be gone with Redis: they end locally as before.
        self._held.clear()
        for backend in self._backends.values():
            backend.shared_others = 0
        self._connected.set()
        self._on_change()

    def backend_added(self, backend: Backend) -> None:
        """A router's model joined the fleet: its shared leases count from the next renewal."""
        self._backends[backend.name] = backend

    @property
    def _display_url(self) -> str:
        return redact_url(self.config.url)

    # -- admission -----------------------------------------------------------------------------

    async def admit(self, lease: Lease, ticket: Ticket, *, force: bool = False) -> Admission:
        """Confirm a locally granted lease in Redis: ``admitted``, ``full`` (other balancers hold
        the slots) or ``deferred`` (a live balancer has an older waiter; not when ``force``)."""
        if self.state == "connecting":
            await self.start()  # the first requests wait (boundedly) for Redis, not admit around it
        if self.state != "shared" or self._client is None:
            return "admitted"
        backend = lease.backend
        member = f"{self.replica}|{next(self._ids)}|{lease.weight}"
        # What this balancer sent but Redis has not seen yet (a release just before, a place in
        # line) goes first, in the same round trip: the decision sees it.
        try:
            async with asyncio.timeout(self.config.timeout_s):
                # Another connection may be carrying earlier news (a release): let it land first.
                await self._sending.wait()
                pending, self._outbox = self._outbox, []
                async with self._client.pipeline(transaction=False) as pipe:
                    await self._queue_ops(pipe, pending)
                    await self._acquire_script(
                        keys=[self._leases_key(backend.name), ticket.line, self._replicas_key],
                        args=[
                            backend.capacity, lease.weight, member, self._ttl_ms, self._channel, backend.name,
                            ticket.member, ticket.arrival_ms, "1" if force else "0",
                        ],
                        client=pipe,
                    )  # fmt: skip
                    admitted, total, deferred = (await pipe.execute())[-1]
        except Exception as error:  # any failure of Redis: availability wins
            # The background loop notices a Redis that stays away, and returns to shared mode
            # at its next renewal when Redis answers again.
            self._fall_back(error)
            return "admitted"
        if lease.released:
            # The request ended while Redis answered: hand the slot straight back.
            if admitted:
                self._send("release", (backend.name, member))
            return "admitted"
        if not admitted:
            self.refused += 1
            if deferred:
                self.deferred += 1
                # The slot is left to an older waiter elsewhere: count it taken here until the
                # next news of this backend (its admission), so no local waiter asks for it again.
                self._claimed_elsewhere.add(backend.name)
                self._set_total(backend, int(total))
                asyncio.get_running_loop().call_later(self.order_grace_s, self._unclaim, backend)
                return "deferred"
            self._set_total(backend, int(total))
            return "full"
        ticket.registered = False  # the script took it off the line
        self._held[member] = lease
        lease.shared_member = member
        self._set_total(backend, int(total))
        return "admitted"

    def _unclaim(self, backend: Backend) -> None:
        if backend.name in self._claimed_elsewhere:
            self._claimed_elsewhere.discard(backend.name)
            self._set_total(backend, backend.shared_total or 0)

    def released(self, lease: Lease) -> None:
        member = lease.shared_member
        if member is None:
            return
        lease.shared_member = None
        if self._held.pop(member, None) is not None and self.state == "shared":
            self._send("release", (lease.backend.name, member))

    def indexed(
        self,
        backend: str,
        blocks: tuple[bytes, ...],
        end: tuple[int, bytes] | None,
        *,
        new_copy: bool = True,
        ram_cache: bool = False,
    ) -> None:
        if self.state == "shared":
            message: dict[str, Any] = {
                "k": "index", "b": backend, "blocks": [block.hex() for block in blocks], "c": new_copy,
                "ram": ram_cache,
            }  # fmt: skip
            if end is not None:
                message["end"] = [end[0], end[1].hex()]
            self._send("publish", message)

    def pinned(self, pin: str, backend: str) -> None:
        if self.state == "shared":
            self._send("publish", {"k": "pin", "p": pin, "b": backend})

    def _send(self, kind: str, payload: Any) -> None:
        self._outbox.append((kind, payload))
        self._outbox_ready.set()

    def _ours(self, backend: Backend) -> int:
        return sum(lease.weight for lease in self._held.values() if lease.backend is backend)

    def _set_total(self, backend: Backend, total: int) -> None:
        before = backend.shared_others
        backend.shared_total = total
        claimed = 1 if backend.name in self._claimed_elsewhere else 0
        backend.shared_others = max(0, total - self._ours(backend)) + claimed
        if backend.shared_others < before:
            self._on_change()

    # -- background work ----------------------------------------------------------------------

    async def _drain_outbox(self) -> None:
        assert self._client is not None
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            # One loop turn first: a slot released and granted again here goes to Redis as one
            # round trip (admit() takes what is pending), the release right before the admission.
            await asyncio.sleep(0)
            batch, self._outbox = self._outbox, []
            if not batch:
                continue
            sending = self._sending = asyncio.Event()  # before any await: admit() must see it
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    await self._queue_ops(pipe, batch)
                    async with asyncio.timeout(self.config.timeout_s):
                        await pipe.execute()
            finally:
                sending.set()

    async def _queue_ops(self, pipe: Pipeline, batch: list[tuple[str, Any]]) -> None:
        for kind, payload in batch:
            if kind == "release":
                backend, member = payload
                keys = [self._leases_key(backend)]
                await self._release_script(keys=keys, args=[member, self._channel, backend], client=pipe)
            elif kind == "wait":
                expire_ms = int(self._wait_expiry_s * 1000)
                await self._wait_script(
                    keys=[payload.line], args=[payload.member, payload.arrival_ms, expire_ms], client=pipe
                )
            elif kind == "unwait":
                pipe.zrem(payload.line, payload.member)
            else:
                payload["r"] = self.replica
                pipe.publish(self._channel, json.dumps(payload))

    async def _renew_forever(self) -> None:
        assert self._client is not None
        interval = self.config.lease_ttl_s / 3
        ttl_ms = self._ttl_ms
        while True:
            names = list(self._backends)  # a router's models join as they are listed
            keys = [self._leases_key(name) for name in names]
            held = list(self._held.items())
            async with asyncio.timeout(self.config.timeout_s):
                if held:
                    await self._renew_script(
                        keys=[self._leases_key(lease.backend.name) for _, lease in held],
                        args=[ttl_ms, *(member for member, _ in held)],
                    )
                now = await self._client.time()
                now_ms = now[0] * 1000 + now[1] // 1000
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.zadd(self._replicas_key, {self.replica: now_ms})
                    pipe.zremrangebyscore(self._replicas_key, "-inf", now_ms - 10 * ttl_ms)
                    pipe.zrangebyscore(self._replicas_key, now_ms - ttl_ms, "+inf")
                    replicas = (await pipe.execute())[2]
                counts = await self._count_script(keys=keys, args=[])
            self._answering()
            self.replicas = sorted(r.decode() if isinstance(r, bytes) else str(r) for r in replicas)
            for name, count in zip(names, counts, strict=True):
                self._set_total(self._backends[name], int(count))
            await asyncio.sleep(interval)

    async def _listen(self) -> None:
        from redis.asyncio import Redis

        # Its own connection without a socket timeout: a quiet channel is not a failure.
        client = Redis.from_url(self.config.url, socket_connect_timeout=self.config.timeout_s, retry=None)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            async with asyncio.timeout(self.config.timeout_s):
                await pubsub.subscribe(self._channel)
            self._connected.set()  # start() returns once peers' news reaches us
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    self._apply(message.get("data"))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()

    def _apply(self, data: Any) -> None:
        try:
            event = json.loads(data)
            kind = event["k"]
            backend = self._backends.get(event["b"])
        except (ValueError, TypeError, KeyError):
            return
        if backend is None:
            return
        if kind == "count":
            self._claimed_elsewhere.discard(backend.name)
            self._set_total(backend, int(event["n"]))
        elif event.get("r") == self.replica:
            return
        elif kind == "index":
            end = event.get("end")
            blocks = tuple(bytes.fromhex(block) for block in event.get("blocks", ()))
            mark = (int(end[0]), bytes.fromhex(end[1])) if end else None
            new_copy, ram_cache = bool(event.get("c", True)), bool(event.get("ram", False))
            self._index.insert(backend.name, blocks, mark, new_copy=new_copy, ram_cache=ram_cache)
        elif kind == "pin":
            self._affinity.set(str(event["p"]), backend.name)

    def snapshot(self) -> SharedSnapshot:
        return SharedSnapshot(
            url=self._display_url,
            state=self.state,
            reason=self.reason,
            replica=self.replica,
            replicas=self.replicas,
            fallbacks=self.fallbacks,
            refused=self.refused,
            deferred=self.deferred,
        )
