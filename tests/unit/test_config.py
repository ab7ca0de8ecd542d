from pathlib import Path

import pytest

from fedgen.config import (
    AggregatorConfig, ConfigError, RunConfig, SiteConfig, TrainingConfig, load_toml, to_toml,
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_site_config_resolves_relative_paths_against_its_file(tmp_path):
    path = _write(tmp_path, 'site_id = "hospital-a"\ndata = "data.csv"\nstate_dir = "state"\n'
                            '[privacy]\nepsilon = 4.0\n')
    site = load_toml(path, SiteConfig)
    assert site.data == tmp_path / "data.csv"
    assert site.state_dir == tmp_path / "state"
    assert site.privacy.epsilon == 4.0 and site.privacy.enabled and site.device == "auto"


@pytest.mark.parametrize("body, field, words", [
    ('site_id = "a"\ndata = "d"\nstate_dir = "s"\ndevise = "cpu"\n', "devise", "unknown key"),
    ('site_id = "a"\ndata = "d"\nstate_dir = "s"\n[privacy]\nepsilon = "lots"\n', "privacy.epsilon", "number"),
    ('site_id = "a"\ndata = "d"\nstate_dir = "s"\n[privacy]\nepsilon = -1\n', "privacy.epsilon", "greater than 0"),
    ('site_id = "a"\nstate_dir = "s"\n', "data", "Field required"),
    ('site_id = "a b"\ndata = "d"\nstate_dir = "s"\n', "site_id", "pattern"),
    ('site_id = "a"\ndata = "d"\nstate_dir = "s"\ndevice = "tpu"\n', "device", "cuda:N"),
])
def test_bad_site_config_names_file_and_field(tmp_path, body, field, words):
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_toml(path, SiteConfig)
    message = str(info.value)
    assert f"{path}: {field}:" in message and words in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_toml(tmp_path / "nope.toml", SiteConfig)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(_write(tmp_path, "site_id = \n"), SiteConfig)


def test_training_config_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        TrainingConfig(strategy="fedsgd")


def test_example_configs_are_valid():
    examples = Path(__file__).resolve().parents[2] / "examples"
    site = load_toml(examples / "site.toml", SiteConfig)
    assert site.site_id == "hospital-a" and site.privacy.epsilon == 8.0
    assert site.state_dir == examples / "state" and site.tls.ca_certificate == examples / "certs" / "ca.pem"
    aggregator = load_toml(examples / "aggregator.toml", AggregatorConfig)
    assert aggregator.tls.crl == examples / "certs" / "crl.pem" and aggregator.control_port == 9093
    run = load_toml(examples / "run.toml", RunConfig)
    assert run.aggregator == examples / "aggregator.toml" and run.training.rounds == 5


def test_to_toml_round_trips_nested_configs(tmp_path):
    run = RunConfig(aggregator=tmp_path / "a.toml", sites=2, labels=["x", "y"],
                    training=TrainingConfig(strategy="fedprox", strategy_options={"proximal_mu": 0.1}))
    path = tmp_path / "run.toml"
    path.write_text(to_toml(run))
    assert load_toml(path, RunConfig) == run
