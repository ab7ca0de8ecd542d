from typer.testing import CliRunner

from fedgen.cli import app

runner = CliRunner()


def test_bad_data_file_is_reported_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sequence,label\nACGT,0\nACGZ,1\n")
    result = runner.invoke(app, ["simulate", "--data", str(bad), "--sites", "2"])
    assert result.exit_code == 2
    assert f"{bad}, line 3" in result.output and "'Z'" in result.output


def test_missing_data_file(tmp_path):
    result = runner.invoke(app, ["simulate", "--data", str(tmp_path / "nope.csv")])
    assert result.exit_code == 2 and "nope.csv" in result.output and "not found" in result.output


def test_unknown_strategy_and_tokenizer_are_rejected():
    result = runner.invoke(app, ["simulate", "--strategy", "fedsgd"])
    assert result.exit_code == 2 and "fedsgd" in result.output
    result = runner.invoke(app, ["simulate", "--tokenizer", "kmer99"])
    assert result.exit_code == 2 and "kmer99" in result.output


def test_more_sites_than_data_is_a_clear_error(tmp_path):
    data = tmp_path / "small.csv"
    data.write_text("sequence,label\n" + "".join(f"ACGTACGT,{i % 2}\n" for i in range(20)))
    result = runner.invoke(app, ["simulate", "--data", str(data), "--sites", "30"])
    assert result.exit_code == 2 and "error:" in result.output


def test_help_lists_the_simulation_options():
    result = runner.invoke(app, ["simulate", "--help"])
    for option in ("--data", "--sites", "--rounds", "--strategy", "--partition", "--epsilon",
                   "--no-dp", "--model", "--seed", "--out", "--json"):
        assert option in result.output


def test_a_used_output_folder_is_refused_and_left_alone(tmp_path):
    (tmp_path / "result.json").write_text("{}")
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not empty" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_nothing_is_written_when_the_input_is_bad(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "--out", str(out), "--model", "nano", "--tokenizer", "bogus"])
    assert result.exit_code == 2 and not out.exists()
