from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2

from ._balancer import Balancer
from ._config import BalancerConfig
from ._transport import HATransport

__all__ = ["HAAsyncClient", "ha_client", "load_config"]


def load_config(config: BalancerConfig | str | Path) -> BalancerConfig:
    """A config as given, or loaded from a JSON, TOML or YAML file."""
    return config if isinstance(config, BalancerConfig) else BalancerConfig.from_file(config)


class HAAsyncClient(httpx2.AsyncClient):
    """An ``httpx2.AsyncClient`` whose requests are balanced over a llama.cpp fleet."""

    def __init__(self, config: BalancerConfig, **kwargs: Any) -> None:
        self._ha_transport = HATransport(config)
        kwargs.setdefault("base_url", "http://llamacpp-ha")
        kwargs.setdefault("timeout", httpx2.Timeout(600.0, connect=config.connect_timeout_s))
        super().__init__(transport=self._ha_transport, **kwargs)

    @property
    def balancer(self) -> Balancer:
        """The engine: ``snapshot()`` for fleet state and counters."""
        return self._ha_transport.balancer


def ha_client(config: BalancerConfig | str | Path, **kwargs: Any) -> HAAsyncClient:
    """An ``httpx2.AsyncClient`` that balances requests over the configured llama-servers.

    Pass it to ``AsyncOpenAI(base_url="http://llamacpp-ha/v1", http_client=...)``: the host in
    the URL is a placeholder that the chosen backend's replaces. ``config`` may be a path to a
    JSON, TOML or YAML file. Other keyword arguments go to ``httpx2.AsyncClient``. Closing the
    client (``await client.aclose()``) stops the engine's background polling.
    """
    return HAAsyncClient(load_config(config), **kwargs)
