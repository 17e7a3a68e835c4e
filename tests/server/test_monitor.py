"""/monitor: one self-contained page over /monitor/data, checked in a real (headless) Chromium."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable

import httpx2
import pytest

from llamacpp_ha.sim import SimServer

from .conftest import AppServer

pytestmark = pytest.mark.anyio

Sims = Callable[..., SimServer]
Serve = Callable[..., AppServer]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def test_monitor_data_is_the_snapshot_plus_history(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=2), sims(slots=2))
    await asyncio.sleep(1.2)  # at least one history sample
    async with httpx2.AsyncClient() as http:
        data = (await http.get(f"{server.url}/monitor/data")).json()
    assert [b["name"] for b in data["snapshot"]["backends"]] == ["b0", "b1"]
    assert data["history"]
    assert set(data["history"][-1]) == {"t", "queue", "in_flight", "busy", "capacity"}
    assert data["history"][-1]["capacity"] == 4
    assert data["server"]["draining"] is False


async def test_the_page_has_no_external_assets(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=1))
    async with httpx2.AsyncClient() as http:
        page = (await http.get(f"{server.url}/monitor")).text
    assert re.findall(r"""(?:src|href)=["']?https?:""", page) == []
    assert "<script>" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
async def test_the_page_shows_each_backend_in_chromium(sims: Sims, serve: Serve) -> None:
    assert CHROMIUM is not None
    server = serve(sims(slots=2), sims(slots=3), server={"api_keys": [{"key": "monitor-key", "name": "ops"}]})
    body = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx2.AsyncClient(base_url=server.url, headers={"authorization": "Bearer monitor-key"}) as http:
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
    with tempfile.TemporaryDirectory() as profile:
        command = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
            f"{server.url}/monitor#key=monitor-key",
        ]  # fmt: skip
        result = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)
    dom = result.stdout
    assert 'data-backend="b0"' in dom, result.stderr[-2000:]
    assert 'data-backend="b1"' in dom
    assert len(re.findall(r'class="slot(?: ours| other)?"', dom)) == 5  # 2 + 3 slot boxes
    assert "tiny-random-llama.gguf" in dom
    assert "<polyline" in dom or "queue" in dom
    # What routing expected beside what the backends reported, per backend and in the summary.
    assert re.search(r'<td class="cache">\d+% \(\d+%\)</td>', dom), dom[-3000:]
    assert "prompt from cache" in dom
