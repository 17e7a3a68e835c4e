"""llamacpp-ha-server: the engine as a shared OpenAI-compatible proxy (``pip install "llamacpp-ha[server]"``)."""

from __future__ import annotations

from ._app import PROXIED_PATHS, ServerContext, create_app
from ._cli import DrainingServer, main
from ._config import ApiKey, ServerConfig, ServerSettings

__all__ = [
    "PROXIED_PATHS",
    "ApiKey",
    "DrainingServer",
    "ServerConfig",
    "ServerContext",
    "ServerSettings",
    "create_app",
    "main",
]
