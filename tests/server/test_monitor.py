"""/monitor: one self-contained page over /monitor/data, checked in a real (headless) Chromium."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest

from llamacpp_ha.sim import SimServer, free_port

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
    assert set(data["history"][-1]) == {
        "t", "queue", "in_flight", "busy", "capacity", "backends", "ttft_p50_ms", "ttft_p99_ms",
        "output_tokens_per_s", "requests_per_s", "cached_share",
    }  # fmt: skip
    assert data["history"][-1]["backends"] == {"b0": 0, "b1": 0}
    assert data["history"][-1]["capacity"] == 4
    assert data["server"]["draining"] is False


async def test_the_page_has_no_external_assets(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=1))
    async with httpx2.AsyncClient() as http:
        page = (await http.get(f"{server.url}/monitor")).text
    assert re.findall(r"""(?:src|href)=["']?https?:""", page) == []
    assert "<script>" in page


SCREENSHOTS = os.environ.get("MONITOR_SCREENSHOTS")
"""Where the Chromium test also saves its screenshots (the README's pictures come from there)."""
CHARTS = ("slots", "ttft", "tokens", "status", "cache", "backends")


async def _chromium(*flags: str, url: str, profile: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--user-data-dir={profile}", "--virtual-time-budget=5000", *flags, url,
    ]  # fmt: skip
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
async def test_the_page_draws_every_chart_at_laptop_and_phone_widths(sims: Sims, serve: Serve, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    keys = {"api_keys": [{"key": "monitor-key", "name": "ops"}]}
    server = serve(sims(slots=2), sims(slots=3), dead, server=keys)
    body = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with httpx2.AsyncClient(base_url=server.url, headers={"authorization": "Bearer monitor-key"}) as http:
        for _ in range(3):  # requests across several history samples
            statuses = await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _request in range(4)))
            assert [r.status_code for r in statuses] == [200] * 4
            bad = await http.post("/v1/chat/completions", json={"model": "nope", "messages": []})
            assert bad.status_code in (400, 404)
            await asyncio.sleep(1.05)
    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    url = f"{server.url}/monitor#key=monitor-key"
    for name, size in (("laptop", "1280,1000"), ("phone", "390,2400")):
        with tempfile.TemporaryDirectory() as profile:
            result = await _chromium(f"--window-size={size}", "--dump-dom", url=url, profile=profile)
        dom = result.stdout
        assert 'data-backend="b0"' in dom, result.stderr[-2000:]
        assert 'data-backend="b1"' in dom
        assert len(re.findall(r'class="slot(?: ours| other)?"', dom)) == 5  # 2 + 3 slot boxes
        assert "tiny-random-llama.gguf" in dom
        # A dead backend says why.
        assert re.search(r'class="state dead">dead<div class="reason">/health: ConnectError', dom)
        for chart in CHARTS:
            drawn = re.search(rf'<svg[^>]*id="chart-{chart}"[^>]*data-points="(\d+)"', dom)
            assert drawn is not None, f"{name}: chart {chart} was not drawn"
            assert int(drawn.group(1)) >= 2, f"{name}: chart {chart} drew no data"
            assert re.search(rf'id="chart-{chart}"[^>]*>.*?<polyline', dom, re.S), f"{name}: no line in {chart}"
        # Axes carry ticks with units, and the latest requests are listed with their routing.
        assert re.search(r"<text[^>]*>\d+(\.\d)?k? ms</text>", dom)
        assert re.search(r"<text[^>]*>-\d+ s</text>", dom)
        assert len(re.findall(r"<tr><td>\d\d:\d\d:\d\d</td>", dom)) == 15
        # What routing expected beside what the backends reported, per backend and in the summary.
        assert re.search(r'<td class="cache">\d+% \(\d+%\)</td>', dom), dom[-3000:]
        assert "prompt from cache" in dom
        assert "waited for a cache" in dom
        with tempfile.TemporaryDirectory() as profile:
            picture = shots / f"monitor-{name}.png"
            await _chromium(f"--window-size={size}", f"--screenshot={picture}", url=url, profile=profile)
        assert picture.stat().st_size > 10_000
