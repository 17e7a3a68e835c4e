from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = ["BackendConfig", "BalancerConfig", "PolicyName", "SharedConfig"]

PolicyName = Literal["affinity", "least_busy", "round_robin"]


class BackendConfig(BaseModel):
    """One llama-server the balancer may send requests to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    """Base URL of the llama-server, e.g. ``http://gpu-1:8080``. A path prefix is kept."""
    name: str = ""
    """Shown in logs, snapshots and the ``x-llamacpp-ha-backend`` header; defaults to ``host:port``."""
    api_key: SecretStr | None = None
    """Sent as ``Authorization: Bearer`` on polls and forwarded requests (llama-server ``--api-key``)."""
    capacity: int | None = Field(default=None, ge=1)
    """Overrides the slot count read from ``/slots`` or ``/props``."""
    models: list[str] | None = None
    """Overrides the model ids read from ``/v1/models``."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {value!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"must not have a query or fragment, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _default_name(self) -> BackendConfig:
        if not self.name:
            parts = urlsplit(self.url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            object.__setattr__(self, "name", f"{parts.hostname}:{port}")
        return self


class SharedConfig(BaseModel):
    """Several balancers sharing one fleet through Redis (or Valkey): ``[shared]`` in a file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^(redis|rediss|unix)://")
    """Where Redis answers, e.g. ``redis://127.0.0.1:6379/0`` (``rediss://`` for TLS)."""
    namespace: str = Field(default="llamacpp-ha", min_length=1)
    """Prefix of every key and channel: balancers of different fleets may share one Redis."""
    lease_ttl_s: float = Field(default=10.0, gt=0)
    """A slot lease not renewed for this long is gone: a balancer that died gives its slots back."""
    timeout_s: float = Field(default=0.5, gt=0)
    """Longest any Redis call may take; past it the balancer admits locally until Redis answers."""
    retry_interval_s: float = Field(default=1.0, gt=0)
    """How often an unreachable Redis is tried again."""


class BalancerConfig(BaseSettings):
    """Everything the engine needs: the fleet and how to balance it.

    Environment variables ``LLAMACPP_HA_<FIELD>`` (nested with ``__``) override values given
    as keyword arguments or read from a file by :meth:`from_file`.
    """

    model_config = SettingsConfigDict(
        env_prefix="LLAMACPP_HA_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    backends: list[BackendConfig] = Field(min_length=1)
    policy: PolicyName = "affinity"
    """How a backend is chosen among those with a free slot."""
    poll_interval_s: float = Field(default=1.0, gt=0)
    poll_timeout_s: float = Field(default=2.0, gt=0)
    queue_timeout_s: float = Field(default=60.0, gt=0)
    """How long a request may wait in the queue for a free slot before it gets 503."""
    max_queue: int = Field(default=1000, ge=0)
    """Waiting requests beyond this get 429 at once."""
    max_attempts: int = Field(default=3, ge=1)
    """Backends tried for one request when the earlier ones failed before answering."""
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=600.0, gt=0)
    """Longest a backend may send nothing (the wait for a non-stream answer included; the caller's
    own read timeout wins when shorter): then 504 ``upstream_timeout``, or an error event mid-stream."""
    stream_idle_timeout_s: float = Field(default=60.0, gt=0)
    """A response body nobody has read from for this long is closed and its slot given back."""
    affinity_ttl_s: float = Field(default=1800.0, gt=0)
    """How long an explicit pin (``X-Session-Id`` header or ``user`` field) keeps its backend."""
    affinity_max_entries: int = Field(default=100_000, ge=1)
    prefix_block_bytes: int = Field(default=512, ge=16)
    """Size of the prompt blocks whose chained hashes the prefix index keeps (UTF-8 bytes, ~128 tokens)."""
    prefix_max_blocks: int = Field(default=2048, ge=1)
    """Blocks hashed per request at most: past this, a longer match would not change a decision."""
    prefill_backlog_s: float | None = Field(default=1.0, gt=0)
    """A backend with a free slot takes a new request only while the prompts it is processing would
    take less than this (``affinity`` policy; None: off). Under load requests then wait here, where a
    slot that frees picks the request its cache serves best, instead of inside llama-server, where
    every slot would fill with cold prompts and overwrite the cached ones. A request whose own
    uncached prefill takes a tenth of this or less is not held back."""
    patience_max_s: float = Field(default=8.0, ge=0)
    """Longest a request waits for the busy backend that holds its prefix before any free slot serves
    it. The cost model decides whether to wait at all; this only bounds it. A request waiting for a
    running request with its prefix waits about that request's time to finish (seconds under load)."""
    ram_cache_tokens: int = Field(default=65_536, ge=0)
    """Prompt tokens a backend keeps in its RAM prompt cache (llama-server ``--cache-ram``; 8 GiB
    holds about 65k tokens of an 8B model), on top of slots x context. While a request runs with a
    prompt, a second one with the same beginning can load the copy saved there (0: the backends run
    ``--cache-ram 0``, and only another slot that processed it holds it)."""
    down_grace_s: float = Field(default=15.0, ge=0)
    """A request for a model whose every backend is dead fails at once with 503, unless one of them
    is loading or died less than this long ago (a rolling restart): then it waits in the queue."""
    shared: SharedConfig | None = None
    """Share slot leases, the prefix index and session pins with other balancers through Redis
    (needs ``llamacpp-ha[redis]``). Without it the balancer is on its own, as before."""
    allow_unknown_models: bool = False
    """Send a model no backend lists to any backend (llama-server ignores the name) instead of 404."""

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_env_vars(cls, data: Any) -> Any:
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        known = {name.upper() for name in cls.model_fields}
        unknown = sorted(
            key
            for key in os.environ
            if key.upper().startswith(prefix) and key[len(prefix) :].upper().split("__")[0] not in known
        )
        if unknown:
            raise ValueError(f"unknown environment variable(s) {', '.join(unknown)}: no such setting")
        return data

    @field_validator("backends")
    @classmethod
    def _unique_names(cls, backends: list[BackendConfig]) -> list[BackendConfig]:
        names = [backend.name for backend in backends]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"backend names must be unique, repeated: {', '.join(duplicates)}")
        return backends

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file (whose values arrive as init kwargs), so an
        # operator can override one field of a shared config file without editing it.
        return env_settings, init_settings

    @classmethod
    def from_file(cls, path: str | Path) -> BalancerConfig:
        """Load a JSON, TOML or YAML file (chosen by suffix); ``LLAMACPP_HA_*`` variables override it."""
        return cls(**read_config_file(path))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a config file into a dict, choosing the format by the file's suffix."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    # The TOML and YAML parsers are imported only when needed: they add to every import otherwise.
    if suffix == ".json":
        data: Any = json.loads(text)
    elif suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        raise ValueError(f"{path}: unknown config format {suffix!r}; use .json, .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data
