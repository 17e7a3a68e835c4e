from __future__ import annotations

import base64
import logging
import time
from enum import StrEnum
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import httpx2

from ._config import BackendConfig

if TYPE_CHECKING:
    from ._leases import Lease

__all__ = ["Backend", "BackendState", "model_names", "redact_url"]

logger = logging.getLogger("llamacpp_ha")


class BackendState(StrEnum):
    UNKNOWN = "unknown"
    """Not polled successfully yet."""
    HEALTHY = "healthy"
    LOADING = "loading"
    """Answers 503 ``Loading model``: not routable until loaded."""
    DEAD = "dead"
    """Does not answer at all."""
    UNLOADED = "unloaded"
    """A router-mode server's model that is not loaded now: the first request sent loads it."""


_ROUTABLE = frozenset({BackendState.HEALTHY, BackendState.UNLOADED})


def redact_url(url: str) -> str:
    """The URL with any user info (``user:password@``) hidden, for logs and snapshots."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def model_names(model_id: str, aliases: tuple[str, ...] = ()) -> set[str]:
    """The names a request may use for a model: its id, aliases, and each without ``.gguf``.

    llama-server reports ``-m`` as given, so a server started with a full path has the path as its
    model id: the file name counts too (``/models/qwen.gguf`` answers to ``qwen``).
    """
    names = {model_id, *aliases}
    names |= {name.rsplit("/", 1)[-1] for name in names}
    return names | {name.removesuffix(".gguf") for name in names}


class Backend:
    """What the balancer knows and counts about one llama-server.

    ``in_flight`` counts our own leases, updated at once; ``external`` is the load other
    clients put on the backend, as far as the last ``/slots`` poll showed it. Local
    accounting is a guess, the backend is the truth: each poll reconciles the two.
    """

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.name = config.name
        parsed = httpx2.URL(config.url)
        self.url = str(parsed.copy_with(username=None, password=None)).rstrip("/")
        """The URL requests go to; user info in the configured URL becomes an auth header instead,
        so that no client library logs it."""
        self.display_url = redact_url(config.url)
        """The URL as shown in logs and snapshots: credentials in it are hidden."""
        self.base_url = httpx2.URL(self.url)
        """Parsed once: every forwarded request is rewritten onto it."""
        key = config.api_key
        self.auth_headers: dict[str, str] = {}
        """The backend's own ``--api-key`` (or the URL's user info), sent on polls and forwarded requests."""
        if key:
            self.auth_headers["authorization"] = f"Bearer {key.get_secret_value()}"
        elif parsed.username:
            basic = base64.b64encode(f"{parsed.username}:{parsed.password}".encode()).decode()
            self.auth_headers["authorization"] = f"Basic {basic}"
        self._state = BackendState.UNKNOWN
        self._reported_capacity = 0
        self._in_flight = 0
        self._in_flight_peak = 0
        self._external = 0
        self._shared_others = 0
        self.shared_total: int | None = None
        """Slots every balancer together holds here, as Redis last said (shared mode only)."""
        self.free = 0
        """Free slots now: derived, kept current by the setters below (the scheduler reads it per backend)."""
        self.with_free_slots: set[Backend] | None = None
        """The scheduler's set of backends with a free slot, kept by this backend as ``free`` changes
        (so a dispatch need not look at every backend)."""
        self.position = 0
        """Its place in the fleet's order (ties and listings follow it)."""
        self.reason = "not polled yet"
        self.state_since = time.monotonic()
        """When the backend entered its current state."""
        self.sleeping = False
        self.slots_endpoint = True
        self.observed_busy: int | None = None
        self.model_ids: tuple[str, ...] = tuple(config.models or ())
        self._names: frozenset[str] = frozenset(self._names_for(self.model_ids, ()))
        self.models_known = config.models is not None
        self.models_changes = 0
        """How many times the models it serves changed (the scheduler's homes follow them)."""
        self.last_poll: float | None = None
        self.polled = False
        """At least one poll finished (whatever it found)."""
        self.requests = 0
        self.errors = 0
        self.n_ctx: int | None = None
        """Context per slot in tokens, from ``/props``."""
        self.leases: set[Lease] = set()
        """Our leases on this backend now."""
        self.generation = 0
        """Counts the times the backend became ready (a router's model: stopped running): a new
        generation has empty prompt caches."""
        self.prefill_rate: float | None = None
        """Learned prompt tokens per second (moving average of what responses report)."""
        self.service_s: float | None = None
        """Learned time a request holds a slot here (moving average)."""
        self.prompt_tokens = 0
        """Prompt tokens of finished responses, as reported by the backend."""
        self.cached_tokens = 0
        """Of those, served from the backend's prompt cache (``timings.cache_n``)."""
        self.expected_cached_tokens = 0.0
        """What the prefix index expected to be cached, for the same responses."""
        self.is_router = False
        """A router-mode llama-server (``--models-dir``): it serves through its ``children``, one per model."""
        self.children: dict[str, Backend] = {}
        """Router mode: one backend per model the router lists, each with its own slots and cache."""
        self.router: Backend | None = None
        """Set on a router's model: the router whose URL it is reached at."""
        self.router_model: str | None = None
        """Set on a router's model: its id, sent as ``?model=`` on polls."""
        self.autoload = False
        """A router's model: the router loads it on the first request (``--models-autoload``)."""
        self.load_s: float | None = None
        """A router's model: learned time from the request that loads it to its first byte."""

    @staticmethod
    def _names_for(ids: tuple[str, ...], aliases: tuple[str, ...]) -> set[str]:
        names: set[str] = set()
        for model_id in ids:
            names |= model_names(model_id)
        return names | model_names(aliases[0], aliases) if aliases else names

    def child(self, model_id: str) -> Backend:
        """This router's backend for one of its models, made when first listed."""
        found = self.children.get(model_id)
        if found is None:
            config = BackendConfig(url=self.config.url, name=f"{self.name}/{model_id}", api_key=self.config.api_key)
            found = Backend(config)
            found.router = self
            found.router_model = model_id
            found.display_url = f"{self.display_url} (model {model_id})"
            self.children[model_id] = found
        return found

    def _update_free(self) -> None:
        used = self._in_flight + self._external + self._shared_others
        self.free = max(0, self.capacity - used) if self.routable else 0
        if self.with_free_slots is not None:
            if self.free > 0:
                self.with_free_slots.add(self)
            else:
                self.with_free_slots.discard(self)

    @property
    def state(self) -> BackendState:
        return self._state

    @state.setter
    def state(self, value: BackendState) -> None:
        self._state = value
        self._update_free()

    @property
    def reported_capacity(self) -> int:
        return self._reported_capacity

    @reported_capacity.setter
    def reported_capacity(self, value: int) -> None:
        self._reported_capacity = value
        self._update_free()

    @property
    def in_flight(self) -> int:
        """Slots held by our own leases."""
        return self._in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self._in_flight = value
        self._in_flight_peak = max(self._in_flight_peak, value)
        self._update_free()

    @property
    def external(self) -> int:
        """Busy slots that are not ours, as of the last poll."""
        return self._external

    @external.setter
    def external(self, value: int) -> None:
        self._external = value
        self._update_free()

    @property
    def shared_others(self) -> int:
        """Slots other balancers hold here, by the shared leases in Redis (shared mode)."""
        return self._shared_others

    @shared_others.setter
    def shared_others(self, value: int) -> None:
        self._shared_others = value
        self._update_free()

    @property
    def capacity(self) -> int:
        if self._state is BackendState.UNLOADED:
            # One request loads the model; the rest wait here until a poll reads its slots.
            return 1 if self.autoload else 0
        return self.config.capacity or self._reported_capacity

    @property
    def routable(self) -> bool:
        return self._state in _ROUTABLE and self.capacity > 0

    @property
    def free_slots(self) -> int:
        return self.free

    @property
    def load(self) -> float:
        """Busy fraction of the slots, ours and others'. A model still to load counts as full:
        any free slot of a loaded one is better."""
        if self._state is BackendState.UNLOADED:
            return 1.0
        # (The fields, not their properties: a dispatch over hundreds of free backends sorts by this.)
        capacity = self.capacity
        return (self._in_flight + self._external + self._shared_others) / capacity if capacity else 1.0

    @property
    def runs_model(self) -> bool:
        """Its model runs, is loading, or is being loaded by a request of ours."""
        return self._state in (BackendState.HEALTHY, BackendState.LOADING) or self._in_flight > 0

    def pending_prefill(self, now: float) -> float:
        """Uncached prompt tokens of our requests that are still being processed here."""
        return self.prefill_work(now)[0]

    def prefill_work(self, now: float) -> tuple[float, int]:
        """Uncached prompt tokens still being processed here, and by how many of our requests."""
        tokens = 0.0
        count = 0
        for lease in self.leases:
            if lease.prefilling(now):
                tokens += lease.uncached_tokens
                count += 1
        return tokens, count

    def serves(self, model: str | None) -> bool:
        return model is None or model in self._names

    def set_models(self, ids: tuple[str, ...], aliases: tuple[str, ...] = ()) -> None:
        if self.config.models is not None:
            return
        self.model_ids = ids
        names = frozenset(self._names_for(ids, aliases))
        if names != self._names:
            self.models_changes += 1
        self._names = names
        self.models_known = True

    def set_state(self, state: BackendState, reason: str) -> None:
        self.reason = reason
        if state is self.state:
            return
        # A router loading or unloading one of its models is routine; a server doing so restarted.
        routine = self.router is not None and state is not BackendState.DEAD
        level = logging.WARNING if state in (BackendState.DEAD, BackendState.LOADING) and not routine else logging.INFO
        logger.log(level, "backend %s (%s): %s -> %s: %s", self.name, self.display_url, self.state, state, reason)
        if self.router is None and state is BackendState.HEALTHY:
            self.generation += 1
        elif self.router is not None and self.state is BackendState.HEALTHY:
            # A router's model stopped running (unloaded, or its router is down): its cache is gone.
            # Not counted when it comes back, since the request that loaded it filled it already.
            self.generation += 1
        self.state_since = time.monotonic()
        self.state = state

    def begin_poll(self) -> None:
        """A ``/slots`` poll is about to be sent: count our leases from now until it answers."""
        self._in_flight_peak = self._in_flight

    def reconcile(self, observed_busy: int | None) -> None:
        """Take the busy count a ``/slots`` poll saw, net of our own leases.

        Our leases may have been taken or given back while the poll was on the wire, so the
        most we held at any moment since it was sent is subtracted: a request we just sent may
        not show as busy yet, and one that came and went may still show.
        """
        self.observed_busy = observed_busy
        self.last_poll = time.monotonic()
        if observed_busy is None:
            self.external = 0
            return
        # Other balancers' requests are in Redis: only other clients count as external.
        self.external = max(0, observed_busy - self._in_flight_peak - self._shared_others)
