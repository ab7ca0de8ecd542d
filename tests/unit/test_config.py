from pathlib import Path

import pytest
import tomllib

from fedgen.config import (
    AggregatorConfig,
    ConfigError,
    RunConfig,
    SiteConfig,
    SiteTLSConfig,
    TrainingConfig,
    load_toml,
    to_toml,
    write_toml,
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_site_config_resolves_relative_paths_against_its_file(tmp_path):
    path = _write(
        tmp_path, 'site_id = "hospital-a"\ndata = "data.csv"\nstate_dir = "state"\n[privacy]\nepsilon = 4.0\n'
    )
    site = load_toml(path, SiteConfig)
    assert site.data == tmp_path / "data.csv"
    assert site.state_dir == tmp_path / "state"
    assert site.privacy.epsilon == 4.0 and site.privacy.enabled and site.device == "auto"


@pytest.mark.parametrize(
    "body, field, words",
    [
        ('site_id = "a"\ndata = "d"\nstate_dir = "s"\ndevise = "cpu"\n', "devise", "unknown key"),
        ('site_id = "a"\ndata = "d"\nstate_dir = "s"\n[privacy]\nepsilon = "lots"\n', "privacy.epsilon", "number"),
        ('site_id = "a"\ndata = "d"\nstate_dir = "s"\n[privacy]\nepsilon = -1\n', "privacy.epsilon", "greater than 0"),
        ('site_id = "a"\nstate_dir = "s"\n', "data", "Field required"),
        ('site_id = "a b"\ndata = "d"\nstate_dir = "s"\n', "site_id", "pattern"),
        ('site_id = "a"\ndata = "d"\nstate_dir = "s"\ndevice = "tpu"\n', "device", "cuda:N"),
    ],
)
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
    run = RunConfig(
        aggregator=tmp_path / "a.toml",
        sites=2,
        labels=["x", "y"],
        training=TrainingConfig(strategy="fedprox", strategy_options={"proximal_mu": 0.1}),
    )
    path = tmp_path / "run.toml"
    path.write_text(to_toml(run, path))
    assert load_toml(path, RunConfig) == run


SITE = 'site_id = "a"\ndata = "d.csv"\nstate_dir = "s"\n'
TLS = '[tls]\ncertificate = "c"\nprivate_key = "k"\nca_certificate = "ca"\ncrl = "crl"\n'
RUN = 'aggregator = "a.toml"\nsites = 2\nlabels = ["0", "1"]\n'


@pytest.mark.parametrize(
    "model, body, field, words",
    [
        (SiteConfig, SITE + 'runtime_port = "19120"\n', "runtime_port", "valid integer"),
        (SiteConfig, SITE + "runtime_port = 19120.0\n", "runtime_port", "valid integer"),
        (SiteConfig, SITE + '[privacy]\nenabled = "false"\n', "privacy.enabled", "valid boolean"),
        (SiteConfig, SITE + "[privacy]\nenabled = 0\n", "privacy.enabled", "valid boolean"),
        (SiteConfig, SITE + '[privacy]\nepsilon = "8"\n', "privacy.epsilon", "valid number"),
        (SiteConfig, 'site_id = 7\ndata = "d.csv"\nstate_dir = "s"\n', "site_id", "valid string"),
        (SiteConfig, 'site_id = "a"\ndata = 3\nstate_dir = "s"\n', "data", "path"),
        (AggregatorConfig, 'state_dir = "s"\nfleet_port = "9092"\n' + TLS, "fleet_port", "valid integer"),
        (RunConfig, 'aggregator = "a.toml"\nsites = "2"\nlabels = ["0", "1"]\n', "sites", "valid integer"),
        (RunConfig, 'aggregator = "a.toml"\nsites = 2\nlabels = ["0", 1]\n', "labels.1", "valid string"),
        (RunConfig, RUN + '[training]\nrounds = "5"\n', "training.rounds", "valid integer"),
        (RunConfig, RUN + "[training]\nbatch_size = 32.0\n", "training.batch_size", "valid integer"),
    ],
)
def test_a_value_of_the_wrong_type_is_an_error_naming_file_and_field(tmp_path, model, body, field, words):
    path = tmp_path / "config.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_toml(path, model)
    assert f"{path}: {field}: " in str(info.value) and words in str(info.value)


def test_integers_load_where_numbers_belong_and_strings_where_paths_belong(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(RUN + "[training]\nlocal_epochs = 1\nlearning_rate = 1\nround_timeout = 60\n")
    run = load_toml(path, RunConfig)
    assert run.training.local_epochs == 1.0 and isinstance(run.training.local_epochs, float)
    assert run.aggregator == tmp_path / "a.toml"


def test_load_toml_returns_absolute_paths_for_a_relative_file(tmp_path, monkeypatch):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "site.toml").write_text(SITE)
    monkeypatch.chdir(tmp_path)
    site = load_toml(Path("site/site.toml"), SiteConfig)
    assert site.data == tmp_path / "site" / "d.csv" and site.state_dir == tmp_path / "site" / "s"


def test_written_paths_are_relative_inside_the_files_folder_and_absolute_outside(tmp_path, monkeypatch):
    """Paths given relative to the working directory are written so that the file reads the
    same files back from any other working directory."""
    monkeypatch.chdir(tmp_path)
    folder = Path("consortium/sites/site-0")
    folder.mkdir(parents=True)
    site = SiteConfig(
        site_id="site-0",
        data=folder / "data.csv",
        state_dir=folder / "state",
        tls=SiteTLSConfig(
            certificate=Path("consortium/certs/site-0.pem"),
            private_key=Path("consortium/certs/site-0.key"),
            ca_certificate=tmp_path / "consortium/certs/ca.pem",
        ),
    )
    path = write_toml(site, folder / "site.toml")
    written = tomllib.loads(path.read_text())
    assert written["data"] == "data.csv" and written["state_dir"] == "state"
    assert written["tls"]["certificate"] == (tmp_path / "consortium/certs/site-0.pem").as_posix()
    assert written["tls"]["ca_certificate"] == (tmp_path / "consortium/certs/ca.pem").as_posix()
    assert list(folder.iterdir()) == [path]  # no partial file left beside it

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for name in (tmp_path / folder / "site.toml", Path("..") / folder / "site.toml"):
        loaded = load_toml(name, SiteConfig)
        assert loaded.data == tmp_path / folder / "data.csv"
        assert loaded.state_dir == tmp_path / folder / "state"
        assert loaded.tls.certificate == tmp_path / "consortium/certs/site-0.pem"
        assert loaded.tls.private_key == tmp_path / "consortium/certs/site-0.key"
