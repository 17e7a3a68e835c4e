from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import httpx2

from ._balancer import Balancer
from ._config import BalancerConfig
from ._transport import HATransport

__all__ = ["BalancedClient", "HAAsyncClient", "client_defaults", "ha_client", "load_config"]


class _HasBalancer(Protocol):
    @property
    def balancer(self) -> Balancer: ...


class BalancedClient:
    """What every balanced client (async or sync, httpx2 or classic httpx) adds: its engine."""

    _ha_transport: _HasBalancer

    @property
    def balancer(self) -> Balancer:
        """The engine: ``snapshot()`` for fleet state and counters."""
        return self._ha_transport.balancer


def client_defaults(config: BalancerConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for the client: a placeholder base URL and a timeout fit for long generations."""
    kwargs.setdefault("base_url", "http://llamacpp-ha")
    # (connect, read, write, pool): a tuple both httpx and httpx2 take.
    kwargs.setdefault("timeout", (config.connect_timeout_s, 600.0, 600.0, 600.0))
    return kwargs


def load_config(config: BalancerConfig | str | Path) -> BalancerConfig:
    """A config as given, or loaded from a JSON, TOML or YAML file."""
    return config if isinstance(config, BalancerConfig) else BalancerConfig.from_file(config)


class HAAsyncClient(BalancedClient, httpx2.AsyncClient):
    """An ``httpx2.AsyncClient`` whose requests are balanced over a llama.cpp fleet."""

    def __init__(self, config: BalancerConfig, **kwargs: Any) -> None:
        self._ha_transport = HATransport(config)
        super().__init__(transport=self._ha_transport, **client_defaults(config, kwargs))


def ha_client(config: BalancerConfig | str | Path, **kwargs: Any) -> HAAsyncClient:
    """An ``httpx2.AsyncClient`` that balances requests over the configured llama-servers.

    Pass it to ``AsyncOpenAI(base_url="http://llamacpp-ha/v1", http_client=...)``: the host in
    the URL is a placeholder that the chosen backend's replaces. ``config`` may be a path to a
    JSON, TOML or YAML file. Other keyword arguments go to ``httpx2.AsyncClient``. Closing the
    client (``await client.aclose()``) stops the engine's background polling.
    """
    return HAAsyncClient(load_config(config), **kwargs)
