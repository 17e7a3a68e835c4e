"""llamacpp-ha: a slot-aware, prefix-affine load balancer for llama.cpp's llama-server."""

from __future__ import annotations

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
from ._stats import BackendSnapshot, BalancerSnapshot, Counters, SharedSnapshot
from ._sync import HASyncClient, SyncHATransport, ha_sync_client
from ._transport import HATransport, RouteInfo

__version__ = "0.1.0"

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
