from pathlib import Path

import pytest

from fedgen.config import ConfigError, SiteConfig, TrainingConfig, load_toml


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


def test_example_site_config_is_valid():
    example = Path(__file__).resolve().parents[2] / "examples" / "site.toml"
    site = load_toml(example, SiteConfig)
    assert site.site_id == "hospital-a" and site.privacy.epsilon == 8.0
    assert site.state_dir == example.parent / "state"
