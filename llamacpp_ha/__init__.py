"""llamacpp-ha: a slot-aware, prefix-affine load balancer for llama.cpp's llama-server."""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from ._backend import BackendState
from ._balancer import Balancer
from ._client import HAAsyncClient, ha_client
from ._config import BackendConfig, BalancerConfig, SharedConfig
from ._errors import (
    BadRequestError,
    BalancerClosedError,
    BalancerError,
    ContextLengthError,
    ModelNotFoundError,
    NoBackendError,
    QueueFullError,
    QueueTimeoutError,
    UpstreamTimeoutError,
)
from ._transport import HATransport, RouteInfo

if _typing.TYPE_CHECKING:
    from ._snapshot import BackendSnapshot, BalancerSnapshot, Counters, SharedSnapshot
    from ._sync import HASyncClient, SyncHATransport, ha_sync_client

__version__ = "0.1.0"

# Imported when first used, not by every import: the sync face pulls in anyio's thread portal,
# the snapshot models are pydantic classes built at import.
_LAZY = {
    "HASyncClient": "._sync",
    "SyncHATransport": "._sync",
    "ha_sync_client": "._sync",
    "BackendSnapshot": "._snapshot",
    "BalancerSnapshot": "._snapshot",
    "Counters": "._snapshot",
    "SharedSnapshot": "._snapshot",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BackendConfig",
    "BackendSnapshot",
    "BackendState",
    "BadRequestError",
    "Balancer",
    "BalancerClosedError",
    "BalancerConfig",
    "BalancerError",
    "BalancerSnapshot",
    "ContextLengthError",
    "Counters",
    "HAAsyncClient",
    "HASyncClient",
    "HATransport",
    "ModelNotFoundError",
    "NoBackendError",
    "QueueFullError",
    "QueueTimeoutError",
    "RouteInfo",
    "SharedConfig",
    "SharedSnapshot",
    "SyncHATransport",
    "UpstreamTimeoutError",
    "__version__",
    "ha_client",
    "ha_sync_client",
]
