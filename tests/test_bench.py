"""Each benchmark runs at a tiny size, so they cannot rot. (Figures are never asserted here.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import fleet, overhead, routing, scheduler


def test_fleet_benchmark_runs(tmp_path: Path) -> None:
    argv = ["--loads", "0.8", "--strategies", "round_robin,affinity", "--duration", "1.5", "--speedup", "20",
            "--backends-count", "2", "--slots", "2", "--output-dir", str(tmp_path)]  # fmt: skip
    assert fleet.main(argv) == 0
    result = json.loads((tmp_path / "fleet.json").read_text())
    assert [cell["strategy"] for cell in result["cells"]] == ["round_robin", "affinity"]
    assert all(cell["requests"] > 0 for cell in result["cells"])
    assert (tmp_path / "fleet.png").stat().st_size > 1000


def test_fleet_benchmark_offers_real_backends_loads_of_their_measured_speed(tmp_path: Path) -> None:
    from bench.workload import CALIBRATION, make_trace
    from llamacpp_ha.sim import SimProcess

    # A backend 20x as fast as the calibration (standing in for a real llama-server on a faster
    # machine): "80%" offers it 20x the calibrated requests/s.
    fast = {"prefill_tokens_per_s": CALIBRATION["prefill_tokens_per_s"] * 20,
            "decode_tokens_per_s": CALIBRATION["decode_tokens_per_s"] * 20}  # fmt: skip
    with SimProcess(
        slots=2, n_ctx=16384, prefill_tokens_per_s=fast["prefill_tokens_per_s"],
        decode_tokens_per_s=fast["decode_tokens_per_s"], prefill_slows_decode=CALIBRATION["prefill_slows_decode"],
    ) as sim:  # fmt: skip
        argv = ["--backends", sim.url, "--loads", "0.8", "--strategies", "affinity", "--duration", "1.5",
                "--slots", "2", "--output-dir", str(tmp_path)]  # fmt: skip
        assert fleet.main(argv) == 0
        result = json.loads((tmp_path / "fleet.json").read_text())
        measured = result["settings"]["measured_speed"]
        rates = f"{measured['prefill_tokens_per_s']},{measured['decode_tokens_per_s']}"
        assert fleet.main([*argv, "--rates", rates, "--output-dir", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "fleet.json").read_text())
    assert measured["prefill_tokens_per_s"] == pytest.approx(fast["prefill_tokens_per_s"], rel=0.3)
    assert measured["decode_tokens_per_s"] == pytest.approx(fast["decode_tokens_per_s"], rel=0.3)
    assert result["cells"][0]["requests"] > 0
    assert again["cells"][0]["requests"] == result["cells"][0]["requests"], "--rates replays the same trace"
    calibrated = make_trace(load=0.8, duration_s=10, backends=1, slots=2)
    scaled = make_trace(load=0.8, duration_s=10, backends=1, slots=2, speed={**CALIBRATION, **fast})
    assert scaled.requests_per_s == pytest.approx(20 * calibrated.requests_per_s)


def test_overhead_benchmark_runs(tmp_path: Path) -> None:
    output = tmp_path / "overhead.json"
    assert overhead.main(["--requests", "20", "--warmup", "2", "--quiet", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert set(result["latency"]["chat"]) == {"direct", "ha_client", "proxy"}
    assert result["proxy_peak_rss_mb"] > 0


def test_scheduler_benchmark_runs(tmp_path: Path) -> None:
    output = tmp_path / "scheduler.json"
    assert scheduler.main(["--backends", "2,5", "--waiting", "50", "--decisions", "20", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert [row["backends"] for row in result["by_backends"]] == [2, 5]
    # Arrivals are timed beside releases, and as many arrive as slots are given back: the queue keeps its length.
    assert all(row["arrival_p50_us"] > 0 for row in result["by_backends"])
    assert all(40 <= row["waiting"] <= 60 for row in result["by_backends"])
    assert result["import_time_ms"] > 0


def test_routing_benchmark_runs(tmp_path: Path) -> None:
    argv = ["--workloads", "agent,no_reuse", "--loads", "0.8", "--strategies", "round_robin,affinity",
            "--duration", "2", "--drain", "2", "--speedup", "4", "--scale", "0.05", "--backends-count", "2",
            "--slots", "2", "--output-dir", str(tmp_path)]  # fmt: skip
    assert routing.main(argv) == 0
    result = json.loads((tmp_path / "routing.json").read_text())
    cells = result["cells"]
    assert [(c["workload"], c["strategy"]) for c in cells] == [
        ("agent", "round_robin"), ("agent", "affinity"), ("no_reuse", "round_robin"), ("no_reuse", "affinity"),
    ]  # fmt: skip
    assert all(c["completed"] > 0 for c in cells)
    assert cells[1]["balancer"]["cached_share"] >= 0  # our own view is reported beside the clients'
    assert (tmp_path / "routing-agent.png").stat().st_size > 1000


def test_each_routing_cell_salts_its_prompts_so_no_cell_finds_another_cells_cache() -> None:
    from bench.routing import salted

    turn = [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": "go"}]
    first, second = salted(turn, "0a1b"), salted(turn, "9f8e")
    assert first[0]["content"] == "[0a1b] You are a coding agent."
    assert first[1:] == turn[1:]
    assert first[0]["content"] != second[0]["content"]
    assert turn[0]["content"] == "You are a coding agent.", "the workload itself is not changed"


def test_benchmark_filler_is_one_simulator_token_a_word_and_deterministic_by_prefix() -> None:
    from bench.vocabulary import words
    from llamacpp_ha.sim._text import tokenize

    text = words("p3x", 600)
    assert len(tokenize(text)) == 600, "prompt lengths in the workloads are counted in words"
    assert len(text.encode()) > 600 * 5, "several 512-byte prefix blocks even for a short prompt"
    assert words("p3x", 600) == text
    assert text.startswith(words("p3x", 200) + " "), "a shorter run of one tag is its prefix (trace blocks)"
    assert words("p4x", 600)[:512] != text[:512], "another tag shares no first block"


@pytest.mark.anyio
async def test_the_in_order_strategy_runs_the_default_policy_without_waiting() -> None:
    from bench.strategies import make_strategy
    from llamacpp_ha.sim import SimServer

    with SimServer(slots=1, decode_tokens_per_s=math.inf, prefill_tokens_per_s=math.inf) as sim:
        strategy = make_strategy("in_order")
        await strategy.start([sim.url], time_scale=8.0)
        try:
            assert strategy._client is not None  # type: ignore[attr-defined]
            config = strategy._client.balancer.config  # type: ignore[attr-defined]
            assert (config.policy, config.patience_max_s, config.prefill_backlog_s) == ("affinity", 0.0, None)
            messages = [{"role": "user", "content": "hi"}]
            body = {"model": "tiny-random-llama", "messages": messages, "stream": True, "max_tokens": 2}
            async with strategy.stream(body) as response:
                assert response.status_code == 200
                await response.aread()
        finally:
            await strategy.close()
