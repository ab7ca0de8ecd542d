"""Every command that takes a path accepts one relative to the working directory, and
every file fedgen writes names its files so that it reads the same from anywhere.

`fedgen aggregator start`, `fedgen site start`, `fedgen run` and `fedgen demo --out`
with relative paths run as real processes in tests/integration/test_newcomer.py
(`make demo` from a fresh copy of the repository).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedgen import pki
from fedgen.cli import app
from fedgen.cli.demo import write_consortium
from fedgen.client.supernode import check_site
from fedgen.config import AggregatorConfig, RunConfig, SiteConfig, load_toml
from fedgen.data import load_bundled
from fedgen.server.aggregator import check_aggregator
from fedgen.server.coordinator import plan_run

runner = CliRunner()


def fedgen(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Two unrelated working directories side by side: where files are made, where they are used."""
    made, used = tmp_path / "operator", tmp_path / "auditor"
    made.mkdir()
    used.mkdir()
    return made, used


def test_a_consortium_written_under_a_relative_folder_reads_back_from_another_directory(folders, monkeypatch):
    made, used = folders
    monkeypatch.chdir(made)
    aggregator_toml, site_tomls, run_toml = write_consortium(Path("runs/demo"), sites=2, rounds=1, epsilon=8.0, seed=0)
    assert not aggregator_toml.is_absolute()
    root = made / "runs" / "demo"
    monkeypatch.chdir(used)
    relative = Path("..") / made.name / "runs" / "demo"

    aggregator = load_toml(relative / "aggregator" / "aggregator.toml", AggregatorConfig)
    check_aggregator(aggregator, "aggregator.toml")  # every file found, the key matches its certificate
    assert aggregator.state_dir == root / "aggregator" / "state"
    assert aggregator.tls.certificate == root / "certs" / "aggregator.pem"
    for index, site_toml in enumerate(site_tomls):
        site = load_toml(Path("..") / made.name / site_toml, SiteConfig)
        check_site(site, str(site_toml))  # certificate, key, CA and data all found
        assert site.data == root / "sites" / f"site-{index}" / "data.csv"
        assert site.state_dir == root / "sites" / f"site-{index}" / "state"
    run = load_toml(relative / "run.toml", RunConfig)
    assert run.aggregator == root / "aggregator" / "aggregator.toml"
    planned, plan = plan_run(run, "run.toml")
    assert planned == aggregator
    assert plan.lineage.signing.certificate == root / "certs" / "lineage.pem"
    assert plan.out_dir.is_relative_to(root / "aggregator" / "state" / "runs")

    # `fedgen lineage … --config` finds the aggregator's ledger through the same file.
    missing = runner.invoke(app, ["lineage", "show", "--config", str(relative / "aggregator" / "aggregator.toml")])
    assert missing.exit_code == 2
    assert str(root / "aggregator" / "state" / "lineage.jsonl") in missing.output.replace("\n", "")


def test_certs_commands_take_a_relative_folder(folders, monkeypatch):
    made, _ = folders
    monkeypatch.chdir(made)
    fedgen("certs", "init", "--consortium", "c", "--dir", "pki/consortium")
    fedgen("certs", "issue", "aggregator", "--host", "127.0.0.1", "--dir", "pki/consortium")
    fedgen("certs", "issue", "site", "site-a", "--dir", "pki/consortium")
    fedgen("certs", "revoke", "site-a", "--dir", "pki/consortium")
    fedgen("certs", "refresh-crl", "--dir", "pki/consortium")
    listed = json.loads(fedgen("certs", "list", "--json", "--dir", "pki/consortium").stdout)
    files = pki.layout(made / "pki" / "consortium")
    pki.check_key_pair(files.aggregator_cert, files.aggregator_key)
    site = pki.load_certificate(files.site_cert("site-a"))
    assert pki.is_revoked(site, pki.load_crl(files.crl))
    assert {entry["kind"] for entry in listed} >= {"ca", "aggregator", "site"}
    assert sorted(p.name for p in made.iterdir()) == ["pki"]  # nothing written anywhere else


@pytest.mark.slow
def test_a_simulation_and_its_lineage_commands_take_relative_paths(folders, monkeypatch):
    made, used = folders
    train = load_bundled("train")
    data = made.parent / "data" / "mine.csv"
    data.parent.mkdir()
    data.write_text(
        "sequence,label\n" + "".join(f"{train.sequences[i]},{train.label_names[train.labels[i]]}\n" for i in range(400))
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedgen.cli",
            "simulate",
            "--data",
            "../data/mine.csv",
            "--out",
            "runs/sim",
            "--sites",
            "2",
            "--rounds",
            "1",
            "--local-epochs",
            "1",
            "--json",
        ],
        cwd=made,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = made / "runs" / "sim"
    summary = json.loads(proc.stdout)
    saved = json.loads((out / "result.json").read_text())
    assert saved["final_accuracy"] == summary["final_accuracy"]
    checkpoint = Path(saved["rounds"][0]["checkpoint"])
    assert checkpoint.is_absolute() and checkpoint.is_file() and checkpoint.is_relative_to(out)
    assert Path(saved["lineage"]) == out / "lineage.jsonl" and saved["config"]["data"] == str(data)

    monkeypatch.chdir(used)
    sim = Path("..") / made.name / "runs" / "sim"
    budget = json.loads(fedgen("site", "budget", "--json", "--config", str(sim / "sites/site-0/site.toml")).stdout)
    assert budget["epsilon_spent"] == pytest.approx(summary["rounds"][0]["epsilon"]["site-0"], rel=1e-9)
    ledger = str(sim / "lineage.jsonl")
    shown = fedgen("lineage", "show", "--json", "--ledger", ledger).stdout.splitlines()
    assert [json.loads(line)["type"] for line in shown] == ["run_started", "round_committed", "run_finished"]
    verified = fedgen(
        "lineage",
        "verify",
        "--ledger",
        ledger,
        "--cert",
        str(sim / "pki/lineage.pem"),
        "--ca",
        str(sim / "pki/ca.pem"),
        "--checkpoints",
        str(sim / "checkpoints"),
    )
    assert "OK, 3 records" in verified.stdout and "1 checkpoint digests" in verified.stdout
    fedgen("lineage", "export", "--ledger", ledger, "--out", "prov.json")
    assert "wasGeneratedBy" in json.loads((used / "prov.json").read_text())
    fedgen(
        "model",
        "approve",
        "--round",
        "1",
        "--ledger",
        ledger,
        "--key",
        str(sim / "pki/lineage.key"),
        "--cert",
        str(sim / "pki/lineage.pem"),
        "--by",
        "Dr. A. Reviewer",
        "--reason",
        "reviewed",
    )
    fedgen(
        "model",
        "export",
        "--round",
        "1",
        "--ledger",
        ledger,
        "--cert",
        str(sim / "pki/lineage.pem"),
        "--ca",
        str(sim / "pki/ca.pem"),
        "--checkpoints",
        str(sim / "checkpoints"),
        "--out",
        "release",
    )
    assert (used / "release" / "model.safetensors").read_bytes() == checkpoint.read_bytes()
    assert "Approved by Dr. A. Reviewer" in (used / "release" / "MODEL_CARD.md").read_text()
