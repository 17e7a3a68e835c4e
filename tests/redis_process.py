"""A throwaway redis-server for the shared-mode tests: the real one, on 127.0.0.1."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

import pytest

from llamacpp_ha.sim._server import free_port

__all__ = ["NAMESPACE", "REDIS", "RedisProcess"]

REDIS = shutil.which("redis-server")
NAMESPACE = "test"


class RedisProcess:
    """A throwaway redis-server: no persistence, its own port and directory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="llamacpp-ha-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        assert REDIS is not None
        command = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [*command, "--dir", self.directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail("redis-server did not come up")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def ping(self) -> bool:
        import redis

        try:
            with redis.Redis(port=self.port, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def waiting(self, model: str) -> int:
        """Requests in the model's fleet-wide line."""
        import redis

        with redis.Redis(port=self.port, socket_timeout=1) as client:
            return int(client.zcard(f"{NAMESPACE}:waiting:{model}"))

    def leases(self, backend: str) -> int:
        """Slots held in Redis on a backend, by weight, counting only unexpired leases."""
        import redis

        with redis.Redis(port=self.port, socket_timeout=1) as client:
            now_s, now_us = client.time()
            members = client.zrangebyscore(f"{NAMESPACE}:leases:{backend}", now_s * 1000 + now_us // 1000, "+inf")
        return sum(int(member.rsplit(b"|", 1)[1]) for member in members)
