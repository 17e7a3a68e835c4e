from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from llamacpp_ha import BackendConfig, BalancerConfig, ha_client

FLEET = {
    "backends": [{"url": "http://gpu-1:8080", "api_key": "k1"}, {"url": "http://gpu-2:8080/", "capacity": 8}],
    "policy": "least_busy",
    "queue_timeout_s": 12.5,
}
TOML = """
policy = "least_busy"
queue_timeout_s = 12.5

[[backends]]
url = "http://gpu-1:8080"
api_key = "k1"

[[backends]]
url = "http://gpu-2:8080/"
capacity = 8
"""
YAML = """
policy: least_busy
queue_timeout_s: 12.5
backends:
  - url: http://gpu-1:8080
    api_key: k1
  - url: http://gpu-2:8080/
    capacity: 8
"""


@pytest.fixture(params=["json", "toml", "yaml"])
def config_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    texts = {"json": json.dumps(FLEET), "toml": TOML, "yaml": YAML}
    path = tmp_path / f"fleet.{request.param}"
    path.write_text(texts[request.param])
    return path


def test_each_format_loads_the_same_config(config_file: Path) -> None:
    config = BalancerConfig.from_file(config_file)
    assert [b.url for b in config.backends] == ["http://gpu-1:8080", "http://gpu-2:8080"]
    assert [b.name for b in config.backends] == ["gpu-1:8080", "gpu-2:8080"]
    assert config.backends[0].api_key is not None
    assert config.backends[0].api_key.get_secret_value() == "k1"
    assert config.backends[1].capacity == 8
    assert config.policy == "least_busy"
    assert config.queue_timeout_s == 12.5
    assert config.max_queue == 1000  # default


def test_environment_overrides_the_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACPP_HA_QUEUE_TIMEOUT_S", "3")
    monkeypatch.setenv("LLAMACPP_HA_POLICY", "round_robin")
    monkeypatch.setenv("LLAMACPP_HA_BACKENDS", '[{"url": "http://other:9000"}]')
    config = BalancerConfig.from_file(config_file)
    assert config.queue_timeout_s == 3
    assert config.policy == "round_robin"
    assert [b.url for b in config.backends] == ["http://other:9000"]


def test_a_typo_in_the_file_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({**FLEET, "queue_timout_s": 3}))
    with pytest.raises(ValidationError, match="queue_timout_s"):
        BalancerConfig.from_file(path)


def test_a_typo_in_a_backend_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("backends:\n  - url: http://a:1\n    capacty: 3\n")
    with pytest.raises(ValidationError, match="capacty"):
        BalancerConfig.from_file(path)


def test_a_bad_value_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('max_queue = -1\n[[backends]]\nurl = "http://a:1"\n')
    with pytest.raises(ValidationError, match="max_queue"):
        BalancerConfig.from_file(path)


def test_a_typo_in_an_environment_variable_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACPP_HA_QUEUE_TIMOUT_S", "3")
    with pytest.raises(ValidationError, match="LLAMACPP_HA_QUEUE_TIMOUT_S"):
        BalancerConfig(backends=[BackendConfig(url="http://a:1")])


@pytest.mark.parametrize(
    "url",
    ["gpu-1:8080", "ftp://gpu-1", "http://", "http://gpu-1:8080/?x=1"],
    ids=["no-scheme", "ftp", "no-host", "query"],
)
def test_a_bad_backend_url_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="url"):
        BackendConfig(url=url)


def test_backend_names_must_be_unique() -> None:
    with pytest.raises(ValidationError, match="repeated: a"):
        BalancerConfig(backends=[BackendConfig(url="http://x:1", name="a"), BackendConfig(url="http://y:1", name="a")])


def test_at_least_one_backend_is_required() -> None:
    with pytest.raises(ValidationError, match="backends"):
        BalancerConfig(backends=[])


def test_an_unknown_suffix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fleet.ini"
    path.write_text("")
    with pytest.raises(ValueError, match=r"unknown config format '\.ini'"):
        BalancerConfig.from_file(path)


@pytest.mark.anyio
async def test_ha_client_accepts_a_path(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(FLEET))
    client = ha_client(path)
    try:
        assert [b.name for b in client.balancer.snapshot().backends] == ["gpu-1:8080", "gpu-2:8080"]
    finally:
        await client.aclose()
