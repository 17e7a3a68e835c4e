from __future__ import annotations

from typing import Any

import anyio
import httpx2

from ._backend import Backend, BackendState

__all__ = ["Registry"]


class Registry:
    """Polls each backend and updates its state, models, capacity and observed load.

    Per poll: ``/health`` (200 ready, 503 loading, no answer dead), then ``/props`` (capacity,
    sleeping, whether ``/slots`` exists) and ``/v1/models``, then ``/slots`` unless the
    backend sleeps (polling ``/slots`` would wake it) or has it disabled. A router-mode server
    is polled with its models, one backend each (see :meth:`_poll_router`). ``/metrics`` is never
    polled: its rate gauges reset on every scrape and we would corrupt the operator's numbers.
    """

    def __init__(self, client: httpx2.AsyncClient, timeout_s: float) -> None:
        self._client = client
        self._timeout = httpx2.Timeout(timeout_s)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _get(self, backend: Backend, path: str) -> httpx2.Response:
        params = {} if backend.router_model is None else {"model": backend.router_model, "autoload": "false"}
        return await self._client.get(
            backend.url + path, params=params, headers=backend.auth_headers, timeout=self._timeout
        )

    async def _get_into(
        self, answers: dict[str, httpx2.Response | httpx2.HTTPError], backend: Backend, path: str
    ) -> None:
        try:
            answers[path] = await self._get(backend, path)
        except httpx2.HTTPError as exc:
            answers[path] = exc

    async def poll(self, backend: Backend) -> None:
        await self._poll(backend)
        if backend.state is not BackendState.HEALTHY:
            # A router that does not answer takes its models down with it.
            for child in backend.children.values():
                child.set_state(backend.state, backend.reason)

    async def _poll(self, backend: Backend) -> None:
        backend.begin_poll()
        try:
            health = await self._get(backend, "/health")
        except httpx2.HTTPError as exc:
            backend.set_state(BackendState.DEAD, _failure("/health", exc))
            return
        if health.status_code == 503:
            backend.set_state(BackendState.LOADING, "loading the model")
            return
        if health.status_code != 200:
            backend.set_state(BackendState.DEAD, f"/health answered {health.status_code}")
            return
        answers: dict[str, httpx2.Response | httpx2.HTTPError] = {}
        async with anyio.create_task_group() as group:
            for path in ("/props", "/v1/models"):
                group.start_soon(self._get_into, answers, backend, path)
        props, models = answers["/props"], answers["/v1/models"]
        if isinstance(props, httpx2.HTTPError):
            backend.set_state(BackendState.DEAD, _failure("/props", props))
            return
        if isinstance(models, httpx2.HTTPError):
            backend.set_state(BackendState.DEAD, _failure("/v1/models", models))
            return
        if props.status_code != 200 or models.status_code != 200:
            failed = props if props.status_code != 200 else models
            backend.set_state(BackendState.DEAD, f"{failed.url.path} answered {failed.status_code}")
            return
        props_body = props.json()
        if isinstance(props_body, dict) and props_body.get("role") == "router":
            await self._poll_router(backend, props_body, models.json())
            return
        self._read_models(backend, models.json())
        await self._read_ready(backend, props_body)

    async def _read_ready(self, backend: Backend, props: Any) -> None:
        """A server (or a router's model) that answered ``/props``: its slots, load and readiness."""
        self._read_props(backend, props)
        backend.reconcile(await self._read_slots(backend))
        backend.set_state(BackendState.HEALTHY, "sleeping" if backend.sleeping else "ready")

    async def _poll_router(self, router: Backend, props: dict[str, Any], models: Any) -> None:
        """A router-mode server: each model it lists is a backend of its own, polled through it.

        Models that run are polled with ``autoload=false``, so that a poll never loads a model
        (nor wakes a sleeping one: ``/slots`` is skipped then, as for any sleeping server).
        """
        router.is_router = True
        router.reported_capacity = 0
        router.set_models(())
        autoload = props.get("models_autoload") is not False
        data = models.get("data") if isinstance(models, dict) else None
        listed: set[str] = set()
        running: list[Backend] = []
        for entry in data if isinstance(data, list) else ():
            model_id = entry.get("id") if isinstance(entry, dict) else None
            if not isinstance(model_id, str) or (
                router.config.models is not None and model_id not in router.config.models
            ):
                continue
            listed.add(model_id)
            child = router.child(model_id)
            child.autoload = autoload
            aliases = tuple(a for a in entry.get("aliases") or () if isinstance(a, str))
            child.set_models((model_id,), (model_id, *aliases))
            status = entry.get("status") if isinstance(entry.get("status"), dict) else {}
            value = status.get("value")
            if status.get("failed") is True:
                child.set_state(BackendState.DEAD, f"failed to load (exit code {status.get('exit_code')})")
            elif value in ("loaded", "sleeping"):
                running.append(child)
            elif value in ("loading", "downloading"):
                child.set_state(BackendState.LOADING, f"{value} the model")
            else:
                _set_unloaded(child)
        for model_id, child in router.children.items():
            if model_id not in listed:
                child.set_state(BackendState.DEAD, "no longer listed by the router")
        async with anyio.create_task_group() as group:
            for child in running:
                group.start_soon(self._poll_router_model, child)
        loaded = sum(1 for child in router.children.values() if child.state is BackendState.HEALTHY)
        router.set_state(BackendState.HEALTHY, f"router: {len(listed)} models, {loaded} loaded")

    async def _poll_router_model(self, child: Backend) -> None:
        child.begin_poll()
        try:
            props = await self._get(child, "/props")
        except httpx2.HTTPError as exc:
            child.set_state(BackendState.DEAD, _failure("/props", exc))
            return
        if props.status_code == 400:
            # Unloaded between the router's list and this poll (``model is not loaded``).
            _set_unloaded(child)
            return
        if props.status_code == 503:
            child.set_state(BackendState.LOADING, "loading the model")
            return
        if props.status_code != 200:
            child.set_state(BackendState.DEAD, f"/props answered {props.status_code}")
            return
        await self._read_ready(child, props.json())

    @staticmethod
    def _read_props(backend: Backend, props: Any) -> None:
        if not isinstance(props, dict):
            return
        total_slots = props.get("total_slots")
        if isinstance(total_slots, int) and total_slots > 0:
            backend.reported_capacity = total_slots
        backend.sleeping = props.get("is_sleeping") is True
        settings = props.get("default_generation_settings")
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        if isinstance(n_ctx, int) and n_ctx > 0:
            backend.n_ctx = n_ctx
        backend.slots_endpoint = props.get("endpoint_slots") is not False

    @staticmethod
    def _read_models(backend: Backend, body: Any) -> None:
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            return
        ids: list[str] = []
        aliases: list[str] = []
        for entry in data:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                ids.append(entry["id"])
                aliases += [a for a in entry.get("aliases") or () if isinstance(a, str)]
        backend.set_models(tuple(ids), tuple(aliases))

    async def _read_slots(self, backend: Backend) -> int | None:
        """The number of busy slots, or None when ``/slots`` cannot tell."""
        if backend.sleeping:
            return 0
        if not backend.slots_endpoint:
            return None
        try:
            response = await self._get(backend, "/slots")
        except httpx2.TimeoutException:
            # /health answered, so a slow /slots is load (e.g. a RAM prompt-cache copy), not death.
            return backend.observed_busy
        except httpx2.HTTPError:
            return None
        if response.status_code == 501:
            backend.slots_endpoint = False
            return None
        slots = response.json() if response.status_code == 200 else None
        if not isinstance(slots, list):
            return None
        backend.reported_capacity = len(slots) or backend.reported_capacity
        return sum(1 for slot in slots if isinstance(slot, dict) and slot.get("is_processing") is True)


def _failure(path: str, exc: Exception) -> str:
    return f"{path}: {type(exc).__name__}: {exc}".rstrip(": ")


def _set_unloaded(child: Backend) -> None:
    reason = "not loaded: the first request loads it" if child.autoload else "not loaded (router autoload off)"
    child.set_state(BackendState.UNLOADED, reason)
