import json

import matplotlib

from fedgen.results import RoundResult, RunResult, SiteRound

matplotlib.use("Agg")


def _result(tmp_path):
    rounds = [
        RoundResult(
            round=1,
            accuracy=0.6,
            loss=0.7,
            checkpoint=str(tmp_path / "r1.safetensors"),
            sites=[
                SiteRound("site-0", "trained", examples=10, epsilon=1.5, train_seconds=1.25),
                SiteRound("site-1", "trained", examples=12, epsilon=1.2, train_seconds=2.5),
            ],
            wall_seconds=3.75,
        ),
        RoundResult(
            round=2,
            accuracy=0.7,
            loss=0.6,
            checkpoint=str(tmp_path / "r2.safetensors"),
            sites=[
                SiteRound("site-0", "trained", examples=10, epsilon=2.5, train_seconds=1.5),
                SiteRound("site-1", "refused", reason="ceiling"),
            ],
            wall_seconds=2.0,
        ),
    ]
    model = {"source": "nano", "architecture": "fedgen-dna-transformer", "base_digest": None}
    return RunResult(rounds=rounds, initial_accuracy=0.5, out_dir=str(tmp_path), config={"sites": 2}, model=model)


def _site(site, status, **detail):
    """A site's entry in the `--json` summary: every SiteRound field, defaults included."""
    entry = {
        "site": site,
        "status": status,
        "examples": 0,
        "train_loss": None,
        "epsilon": None,
        "delta": None,
        "noise_multiplier": None,
        "steps": 0,
        "reason": None,
        "train_seconds": None,
    }
    return {**entry, **detail}


def test_summary_is_the_json_contract(tmp_path):
    summary = _result(tmp_path).summary()
    assert summary == {
        "rounds": [
            {
                "round": 1,
                "accuracy": 0.6,
                "loss": 0.7,
                "epsilon": {"site-0": 1.5, "site-1": 1.2},
                "wall_seconds": 3.75,
                "sites": [
                    _site("site-0", "trained", examples=10, epsilon=1.5, train_seconds=1.25),
                    _site("site-1", "trained", examples=12, epsilon=1.2, train_seconds=2.5),
                ],
            },
            {
                "round": 2,
                "accuracy": 0.7,
                "loss": 0.6,
                "epsilon": {"site-0": 2.5},
                "wall_seconds": 2.0,
                "sites": [
                    _site("site-0", "trained", examples=10, epsilon=2.5, train_seconds=1.5),
                    _site("site-1", "refused", reason="ceiling"),
                ],
            },
        ],
        "final_accuracy": 0.7,
        "model": {"source": "nano", "architecture": "fedgen-dna-transformer", "base_digest": None},
    }


def test_series_for_notebooks(tmp_path):
    result = _result(tmp_path)
    assert result.accuracy == [0.6, 0.7] and result.loss == [0.7, 0.6]
    assert result.epsilon_by_site() == {"site-0": {1: 1.5, 2: 2.5}, "site-1": {1: 1.2}}
    assert [p.name for p in result.checkpoints] == ["r1.safetensors", "r2.safetensors"]


def test_save_keeps_site_detail_and_plot_draws(tmp_path):
    result = _result(tmp_path)
    result.save(tmp_path / "result.json")
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["final_accuracy"] == 0.7
    assert saved["rounds"][1]["sites"][1]["status"] == "refused"
    assert saved["rounds"][1]["epsilon"] == {"site-0": 2.5}
    ax = result.plot()
    assert len(ax.lines) == 1 and len(ax.figure.axes) == 2


def _missed_a_round(tmp_path) -> RunResult:
    """site-1 fails round 2 and trains again in round 3; site-2 joins only in round 3."""

    def trained(site, eps):
        return SiteRound(site, "trained", examples=10, epsilon=eps)

    rounds = [
        RoundResult(round=1, accuracy=0.6, loss=0.7, sites=[trained("site-0", 1.0), trained("site-1", 1.1)]),
        RoundResult(
            round=2,
            accuracy=0.65,
            loss=0.6,
            sites=[trained("site-0", 2.0), SiteRound("site-1", "failed", reason="lost")],
        ),
        RoundResult(
            round=3,
            accuracy=0.7,
            loss=0.5,
            sites=[trained("site-0", 3.0), trained("site-1", 2.1), trained("site-2", 0.9)],
        ),
    ]
    return RunResult(rounds=rounds, initial_accuracy=0.5, out_dir=str(tmp_path), config={"sites": 3})


def test_a_site_that_missed_a_round_keeps_each_epsilon_on_its_round(tmp_path):
    result = _missed_a_round(tmp_path)
    assert result.epsilon_by_site() == {
        "site-0": {1: 1.0, 2: 2.0, 3: 3.0},
        "site-1": {1: 1.1, 3: 2.1},
        "site-2": {3: 0.9},
    }


def test_plot_draws_every_series_at_its_rounds(tmp_path):
    ax = _missed_a_round(tmp_path).plot()
    accuracy_axis, epsilon_axis = ax.figure.axes
    assert accuracy_axis is ax and accuracy_axis.get_ylabel() == "accuracy"
    drawn = {(line.get_label(), tuple(line.get_xdata()), tuple(line.get_ydata())) for line in accuracy_axis.lines}
    assert drawn == {("global accuracy", (1, 2, 3), (0.6, 0.65, 0.7))}
    assert epsilon_axis.get_ylabel() == "ε spent"
    drawn = {(line.get_label(), tuple(line.get_xdata()), tuple(line.get_ydata())) for line in epsilon_axis.lines}
    assert drawn == {
        ("ε site-0", (1, 2, 3), (1.0, 2.0, 3.0)),
        ("ε site-1", (1, 3), (1.1, 2.1)),  # not (1, 2): it missed round 2
        ("ε site-2", (3,), (0.9,)),
    }


def test_round_trip_through_a_dict(tmp_path):
    result = _result(tmp_path)
    again = RunResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result


def test_a_result_written_before_round_timing_still_reads(tmp_path):
    saved = _result(tmp_path).to_dict()
    for row in saved["rounds"]:
        del row["wall_seconds"]
        for site in row["sites"]:
            del site["train_seconds"]
    again = RunResult.from_dict(json.loads(json.dumps(saved)))
    assert [r.wall_seconds for r in again.rounds] == [None, None]
    assert again.summary()["rounds"][0]["sites"][0]["train_seconds"] is None
