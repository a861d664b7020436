"""Configuration: the example works as is; every mistake names the file, the key and what was
expected; CLI overrides win."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import ConfigError
from orchestrator.daemon import load_config as load_settings

REPO = Path(__file__).resolve().parents[1]


def test_the_example_config_loads_as_is() -> None:
    settings = load_settings(REPO / "config.example.toml")
    assert "local" in settings.providers
    assert settings.server.port == 8470


@pytest.mark.parametrize(("text", "expected"), [
    ("[server]\nlisten = 'nope'\n", "server.listen: expected HOST:PORT"),
    ("[engine]\ntick_seconds = 'fast'\n", "engine.tick_seconds: Input should be a valid number"),
    ("[engine]\ntick_seconds = -1\n", "engine.tick_seconds: Input should be greater than 0"),
    ("[engine]\ntick_secnds = 1\n", "engine.tick_secnds: unknown key"),
    ("[providers.local]\ncpu_slots = 'two'\n", "providers.local.cpu_slots: Input should be a valid integer"),
    ("[providers.local]\ncolour = 'red'\n", "providers.local.colour: unknown key"),
    ("[providers.nimbus]\n", "providers.nimbus: unknown provider 'nimbus'"),
    ('[providers.local]\nregion = "eu\\n"\n', "providers.local.region: region must be"),  # a trailing newline
    ("[database]\nurl = 'mysql://x'\n", "database.url: expected a sqlite:// or postgresql:// URL"),
    ("[placement.spot_preemption_priors]\nrunpod = -1\n", "placement.spot_preemption_priors"),
    ("server = 3\n", "server: Input should be a valid dictionary"),
    ("[cluster]\nreplica_id = 'a b; rm -rf /'\n", "cluster.replica_id: String should match pattern"),
    ("[cluster]\nlease_ttl_seconds = 0.5\n", "cluster.lease_ttl_seconds: Input should be greater than or equal to 2"),
    ("[cluster]\nleader = true\n", "cluster.leader: unknown key"),
    ("[moving]\negress_usd_per_gb = -0.1\n", "moving.egress_usd_per_gb: Input should be greater than or equal to 0"),
    ("[moving]\nrestore_mb_per_second = 0\n", "moving.restore_mb_per_second: Input should be greater than 0"),
    ("[moving]\nwait_usd_per_hr = 1\n", "moving.wait_usd_per_hr: unknown key"),
    ("[server\n", "not valid TOML"),
])
def test_mistakes_name_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such file.*config\.example\.toml"):
        load_settings(tmp_path / "nope.toml")


def test_cli_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nlisten = '127.0.0.1:1'\n")
    s = load_settings(path, {"server": {"listen": "127.0.0.1:2", "state_dir": str(tmp_path / "s")}})
    assert s.server.port == 2 and s.state_dir == tmp_path / "s"
    assert s.database_url() == f"sqlite:///{tmp_path / 's' / 'gpuhop.db'}"


@pytest.mark.parametrize("provider", ["runpod", "aws", "local"])
def test_config_example_documents_every_key_a_provider_reads(provider: str) -> None:
    """Each provider's settings are read from its [providers.<name>] table; every key it
    accepts is shown in config.example.toml (commented where it is optional)."""
    import re

    from adapters.registry import adapter_class

    text = (Path(__file__).resolve().parents[1] / "config.example.toml").read_text()
    fields = adapter_class(provider).Settings.model_fields
    missing = [key for key in fields if not re.search(rf"^#?\s*{re.escape(key)}\s*=", text, re.M)]
    assert not missing, f"config.example.toml does not show [providers.{provider}] {missing}"
