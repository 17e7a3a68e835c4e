"""The README documents what the package really has."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from llamacpp_ha import BackendConfig, BalancerConfig, SharedConfig
from llamacpp_ha.sim import SimServer

README = (Path(__file__).parent.parent / "README.md").read_text()


@pytest.mark.parametrize("model", [BalancerConfig, BackendConfig])
def test_the_config_reference_lists_every_field(model: type[BalancerConfig] | type[BackendConfig]) -> None:
    table = README.split(f"| `{model.__name__}` field |", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE))
    assert documented == set(model.model_fields)


def test_the_readme_gives_the_test_command() -> None:
    assert 'pip install -e ".[test]" && python -m pytest' in README
    assert "python -m pytest" in (Path(__file__).parent.parent / ".ci" / "run").read_text()


def test_the_server_config_reference_lists_every_field() -> None:
    from llamacpp_ha_server import ServerSettings

    table = README.split("| `server` field |", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE))
    assert documented == set(ServerSettings.model_fields)


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_readme_python_blocks_run_as_written(sims: Callable[..., SimServer], tmp_path: Path) -> None:
    # The README's fleet: two llama-servers on 127.0.0.1:8080 and :8081 (simulated here).
    for port in (8080, 8081):
        sims(port=port, slots=2)
    # The sync example reads the config file the README shows first.
    (tmp_path / "fleet.toml").write_text(_blocks("toml")[0])
    blocks = _blocks("python")
    assert len(blocks) >= 2
    for block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{block}\n{result.stderr[-3000:]}"
        assert result.stdout.strip(), block  # it printed the model's reply


def test_the_readme_config_blocks_load() -> None:
    from llamacpp_ha_server import ServerConfig

    fleet, server, shared = _blocks("toml")
    # Each loads (a typo in a field name fails here) and says what the README says it does.
    assert [b.url for b in BalancerConfig(**tomllib.loads(fleet)).backends] == [
        "http://127.0.0.1:8080",
        "http://127.0.0.1:8081",
    ]
    assert [key.name for key in ServerConfig(**tomllib.loads(server)).server.api_keys] == ["team-a", "key-2"]
    assert SharedConfig(**tomllib.loads(shared)["shared"]).url == "redis://127.0.0.1:6379/0"


def test_the_readme_uses_the_demo_model() -> None:
    # What the README tells people to send is what --demo serves (and prints a curl for).
    assert "qwen" not in "".join(_blocks("python") + _blocks("bash"))
    assert '"model": "tiny-random-llama"' in "".join(_blocks("bash"))
