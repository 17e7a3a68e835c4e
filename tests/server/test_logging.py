"""What an operator reads: one access line per request, quiet polls, JSON on request, --help."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import httpx2
import pytest
from llamacpp_ha_server._cli import main
from llamacpp_ha_server._logging import JsonFormatter, configure_logging

from llamacpp_ha.sim import SimServer

from ..helpers import eventually
from .conftest import AppServer

pytestmark = pytest.mark.anyio

Sims = Callable[..., SimServer]
Serve = Callable[..., AppServer]
BODY = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi " * 300}], "max_tokens": 3}


async def test_one_access_line_per_request(sims: Sims, serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llamacpp_ha.access")
    server = serve(sims(slots=1), server={"api_keys": [{"key": "sk-secret", "name": "team-a"}]})
    async with httpx2.AsyncClient(base_url=server.url, headers={"authorization": "Bearer sk-secret"}) as http:
        for _ in range(2):
            assert (await http.post("/v1/chat/completions", json=BODY)).status_code == 200
    # The line is written as the response ends, which the client may see a moment before.
    await eventually(lambda: len([r for r in caplog.records if r.name == "llamacpp_ha.access"]) == 2)
    lines = [r for r in caplog.records if r.name == "llamacpp_ha.access"]
    second = lines[1]
    for field in ("status=200", "backend=b0", "key=team-a", "model=tiny-random-llama", "attempts=1", "affinity=hit"):
        assert field in second.getMessage(), field
    assert second.__dict__["cached_tokens"] > 0
    assert second.__dict__["ttft_ms"] is not None
    assert "sk-secret" not in caplog.text


async def test_the_root_redirects_to_the_monitor(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=1), server={"api_keys": ["sk-secret"]})
    async with httpx2.AsyncClient(base_url=server.url) as http:
        response = await http.get("/")
    assert response.status_code == 307
    assert response.headers["location"] == "/monitor"


def test_polls_are_quiet_and_json_lines_carry_fields(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("info", "json")
        assert logging.getLogger("httpx2").getEffectiveLevel() == logging.WARNING
        record = logging.makeLogRecord({"name": "llamacpp_ha.access", "msg": "status=200", "levelno": 20,
                                        "levelname": "INFO", "status": 200, "backend": "b0"})  # fmt: skip
        line = json.loads(JsonFormatter().format(record))
        assert (line["message"], line["status"], line["backend"], line["level"]) == ("status=200", 200, "b0", "info")
        configure_logging("debug", "text")
        assert logging.getLogger("httpx2").getEffectiveLevel() == logging.DEBUG
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        logging.getLogger("httpx2").setLevel(logging.NOTSET)


def test_every_flag_is_described_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--config", "--demo", "--host", "--port", "--demo-backends", "--demo-slots", "--log-level",
                 "--log-format"):  # fmt: skip
        line = next(line for line in text.splitlines() if line.strip().startswith(flag))
        assert len(line.split(maxsplit=2)) >= 2 or flag in text, flag
    assert "simulated llama-servers in --demo" in text
    assert "one line per request" in text
