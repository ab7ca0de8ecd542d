"""`fedgen simulate` refuses bad input with exit code 2 and a message naming the cause."""

import re

from typer.testing import CliRunner

from fedgen.cli import app
from fedgen.config import STRATEGY_NAMES

runner = CliRunner()


def _plain(output: str) -> str:
    """``output`` without Rich's box drawing and line wrapping (usage errors come boxed)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def test_bad_data_file_is_reported_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sequence,label\nACGT,0\nACGZ,1\n")
    result = runner.invoke(app, ["simulate", "--data", str(bad), "--sites", "2"])
    assert result.exit_code == 2
    assert f"error: {bad}, line 3: character 'Z' at position 4 is not one of A, C, G, T, N" in result.output


def test_missing_data_file(tmp_path):
    missing = tmp_path / "nope.csv"
    result = runner.invoke(app, ["simulate", "--data", str(missing)])
    assert result.exit_code == 2 and f"error: {missing}: not found" in result.output


def test_unknown_strategy_and_tokenizer_are_rejected():
    result = runner.invoke(app, ["simulate", "--strategy", "fedsgd"])
    assert result.exit_code == 2
    # Click's usage error: the option, the value and every choice (Click words the rest).
    assert "'--strategy': 'fedsgd' is not one of " + ", ".join(f"'{name}'" for name in STRATEGY_NAMES) in _plain(
        result.output
    )
    result = runner.invoke(app, ["simulate", "--tokenizer", "kmer99"])
    assert result.exit_code == 2 and "error: tokenizer 'kmer99': k must be between 1 and 8, got 99" in result.output


def test_more_sites_than_data_is_a_clear_error(tmp_path):
    data = tmp_path / "small.csv"
    data.write_text("sequence,label\n" + "".join(f"ACGTACGT,{i % 2}\n" for i in range(20)))
    result = runner.invoke(app, ["simulate", "--data", str(data), "--sites", "30"])
    assert result.exit_code == 2
    assert re.search(
        r"error: cannot split \d+ samples among 30 sites: every site needs at least one sample", result.output
    ), result.output


def test_help_lists_the_simulation_options():
    result = runner.invoke(app, ["simulate", "--help"])
    for option in (
        "--data",
        "--sites",
        "--rounds",
        "--strategy",
        "--partition",
        "--epsilon",
        "--no-dp",
        "--model",
        "--seed",
        "--out",
        "--json",
    ):
        assert option in result.output


def test_a_used_output_folder_is_refused_and_left_alone(tmp_path):
    (tmp_path / "result.json").write_text("{}")
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert f"error: {tmp_path}: folder is not empty; choose a new --out or remove the old run" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_nothing_is_written_when_the_input_is_bad(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "--out", str(out), "--model", "nano", "--tokenizer", "bogus"])
    assert result.exit_code == 2 and "error: unknown tokenizer 'bogus'" in result.output
    assert not out.exists()
