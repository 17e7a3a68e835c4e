"""The README documents what the package really has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llamacpp_ha import BackendConfig, BalancerConfig

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
