"""Starting, draining on SIGTERM, bad configs, and the engine without the server's dependencies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest
from llamacpp_ha_server import main

from llamacpp_ha.sim import SimServer, free_port

from ..helpers import eventually

Sims = Callable[..., SimServer]
BODY = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_a_bad_config_file_exits_2_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"backends": [{"url": "http://a:1"}], "server": {"prot": 8000}}))
    assert main(["--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert "server.prot" in error
    assert "Traceback" not in error


def test_a_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_importing_the_package_leaves_the_sync_face_and_display_for_later() -> None:
    # Import time: anyio's thread portal and the HTML/text display load when first used.
    code = (
        "import sys, llamacpp_ha\n"
        "later = ('llamacpp_ha._sync', 'llamacpp_ha._display', 'llamacpp_ha._snapshot', 'llamacpp_ha._shared')\n"
        "print(sorted(m for m in later if m in sys.modules))\n"
        "from llamacpp_ha import ha_sync_client, SyncHATransport\n"
        "print(ha_sync_client.__module__, 'llamacpp_ha._sync' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split("\n")[:2] == ["[]", "llamacpp_ha._sync True"], result.stderr


def test_the_engine_imports_without_fastapi() -> None:
    code = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['fastapi'] = None; sys.modules['starlette'] = None; sys.modules['prometheus_client'] = None\n"
        "import llamacpp_ha\n"
        "for m in pkgutil.walk_packages(llamacpp_ha.__path__, 'llamacpp_ha.'): importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


@pytest.fixture(params=[10.0], ids=["drain-10s"])
def server_process(
    request: pytest.FixtureRequest, sims: Sims, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    sim = sims(slots=1, decode_tokens_per_s=40)
    port = free_port()
    server = {"port": port, "drain_timeout_s": request.param}
    config = {"backends": [{"url": sim.url}], "poll_interval_s": 0.2, "server": server}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "llamacpp_ha_server", "--config", str(path), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx2.get(f"{url}/health").status_code == 200:
                break
        except httpx2.TransportError:
            pass
        assert process.poll() is None, "the server exited"
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.05)
    yield process, url
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
    assert process.stderr is not None
    process.stderr.close()


@pytest.mark.anyio
async def test_sigterm_drains_in_flight_streams_then_exits(server_process: tuple[subprocess.Popen[bytes], str]) -> None:
    process, url = server_process
    body = {**BODY, "max_tokens": 40, "stream": True}
    async with (
        httpx2.AsyncClient(base_url=url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        iterator = response.aiter_text()
        received = [await iterator.__anext__()]
        os.kill(process.pid, signal.SIGTERM)
        await eventually(lambda: _status(url) == 503)
        health = (await http.get("/health")).json()
        assert health["status"] == "draining"
        refused = await http.post("/v1/chat/completions", json=BODY)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "draining"
        received += [chunk async for chunk in iterator]
    assert "".join(received).rstrip().endswith("data: [DONE]")  # the in-flight stream finished
    assert await asyncio.to_thread(process.wait, 15) == 0


def _status(url: str) -> int:
    try:
        return httpx2.get(f"{url}/health").status_code
    except httpx2.TransportError:
        return 0


@pytest.mark.anyio
@pytest.mark.parametrize("server_process", [0.5], ids=["drain-0.5s"], indirect=True)
async def test_streams_longer_than_the_drain_timeout_are_cut(
    server_process: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, url = server_process
    body = {**BODY, "max_tokens": 2000, "stream": True}  # about 50 s at 40 tokens/s
    received: list[str] = []
    async with (
        httpx2.AsyncClient(base_url=url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        iterator = response.aiter_text()
        received.append(await iterator.__anext__())
        os.kill(process.pid, signal.SIGTERM)
        started = time.monotonic()
        with pytest.raises(httpx2.HTTPError):
            async for chunk in iterator:
                received.append(chunk)
    assert "[DONE]" not in "".join(received)
    assert await asyncio.to_thread(process.wait, 15) == 0
    assert time.monotonic() - started < 10  # the 0.5 s drain timeout, then closing; not the whole stream
