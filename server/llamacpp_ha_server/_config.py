from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from llamacpp_ha import BalancerConfig
from llamacpp_ha._config import read_config_file

__all__ = ["ApiKey", "ServerConfig", "ServerSettings"]


class ApiKey(BaseModel):
    """A key clients send as ``Authorization: Bearer <key>``; its name stands for it in metrics and logs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: SecretStr
    name: str = ""

    @field_validator("key")
    @classmethod
    def _not_blank(cls, value: SecretStr) -> SecretStr:
        # An empty key would match a request without one: authentication silently off.
        if not value.get_secret_value().strip():
            raise ValueError("an API key must not be empty or blank")
        return value


class ServerSettings(BaseModel):
    """The ``server`` section of the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: list[ApiKey] = []
    """No keys: no authentication. A plain string is a key without a name."""
    exempt_paths: list[str] = ["/health", "/metrics"]
    """Paths served without a key."""
    cors_origins: list[str] = []
    drain_timeout_s: float = Field(default=30.0, ge=0)
    """On SIGTERM, how long in-flight requests may take to finish before the server closes."""
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    header_timeout_s: float = Field(default=10.0, gt=0)
    """A request whose headers are not complete this long after its first byte gets 408 and its
    connection closed (a slow-header client would otherwise hold a connection forever)."""
    body_timeout_s: float = Field(default=30.0, gt=0)
    """Longest wait for the next piece of a request body; then 408."""
    max_connections: int = Field(default=2048, ge=1)
    """Open connections beyond this get 503 at once."""
    keep_alive_s: int = Field(default=75, ge=1)
    """An idle keep-alive connection is closed after this long. Longer than clients keep idle
    connections pooled (httpx 5 s, aiohttp 15 s): with uvicorn's 5 s default, a client reusing a
    connection just as the server closes it gets a reset. nginx's default is 75 s too."""
    monitor_history_s: int = Field(default=600, ge=10)
    """How much history the monitor's charts keep, sampled once a second."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _plain_keys(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [{"key": item} if isinstance(item, str) else item for item in value]

    @model_validator(mode="after")
    def _name_keys(self) -> ServerSettings:
        named = [key if key.name else ApiKey(key=key.key, name=f"key-{i + 1}") for i, key in enumerate(self.api_keys)]
        names = [key.name for key in named]
        if len(set(names)) != len(names):
            raise ValueError("api_keys: names must be unique")
        object.__setattr__(self, "api_keys", named)
        return self


class ServerConfig(BalancerConfig):
    """The engine's :class:`~llamacpp_ha.BalancerConfig` plus a ``server`` section."""

    server: ServerSettings = ServerSettings()

    @classmethod
    def from_file(cls, path: str | Path) -> ServerConfig:
        return cls(**read_config_file(path))
