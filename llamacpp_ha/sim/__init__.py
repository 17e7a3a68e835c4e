"""A simulated llama-server for tests, demos and benchmarks: ``python -m llamacpp_ha.sim``."""

from __future__ import annotations

from ._app import SimFaults, SimulatedLlamaServer
from ._config import SimConfig
from ._router import SimulatedLlamaRouter
from ._server import SimProcess, SimServer, free_port, free_ports

__all__ = [
    "SimConfig",
    "SimFaults",
    "SimProcess",
    "SimServer",
    "SimulatedLlamaRouter",
    "SimulatedLlamaServer",
    "free_port",
    "free_ports",
]
