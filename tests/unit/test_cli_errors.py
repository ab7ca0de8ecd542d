"""One mapping from errors to exit codes: 2 for a problem the user can fix, 1 for work that
failed on the way, 130 for an interrupt; a bug is never reported as bad input."""

from __future__ import annotations

import click
import pytest
import typer
from typer.testing import CliRunner

from fedgen.cli import app
from fedgen.cli.output import ReportingGroup
from fedgen.client.ledger import BudgetExceeded
from fedgen.config import ConfigError
from fedgen.errors import FedgenError, OperationFailed
from fedgen.server.coordinator import RunFailed

runner = CliRunner()


def _app_raising(error: BaseException) -> typer.Typer:
    """A command group of the kind every `fedgen` group is, whose one command raises ``error``."""
    probe = typer.Typer(cls=ReportingGroup)

    @probe.command()
    def go() -> None:
        raise error

    @probe.command()
    def other() -> None:  # two commands: typer keeps a group, as in the real CLI
        pass

    return probe


@pytest.mark.parametrize(
    "error", [ConfigError("site.toml: [privacy] epsilon: must be > 0"), BudgetExceeded("ε budget of 8 spent")]
)
def test_a_problem_the_user_can_fix_exits_2_with_its_message(error):
    result = runner.invoke(_app_raising(error), ["go"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {error}"


def test_a_failed_run_exits_1_with_its_message():
    result = runner.invoke(_app_raising(RunFailed("run 7 failed: round 2 without quorum")), ["go"])
    assert result.exit_code == 1 and result.stderr.strip() == "error: run 7 failed: round 2 without quorum"


def test_an_interrupt_exits_130():
    result = runner.invoke(_app_raising(KeyboardInterrupt()), ["go"])
    assert result.exit_code == 130 and "error: interrupted" in result.stderr


@pytest.mark.parametrize("bug", [ValueError("bad index"), RuntimeError("invariant broken"), TypeError("None")])
def test_a_programming_error_is_not_reported_as_bad_input(bug):
    result = runner.invoke(_app_raising(bug), ["go"])
    assert result.exception is bug  # propagates: the real command prints its traceback, exit 1
    assert result.exit_code == 1 and "error:" not in result.stderr


def test_the_user_facing_errors_are_fedgen_errors_and_stay_what_callers_catch():
    from fedgen.client.ledger import LedgerError
    from fedgen.client.supernode import SiteStopped
    from fedgen.data import DataError
    from fedgen.lineage import LineageError
    from fedgen.lineage.receipts import ReceiptError
    from fedgen.model_release import ReleaseError
    from fedgen.pki import PKIError
    from fedgen.processes import ProcessFailed
    from fedgen.simulation import SimulationFailed

    for bad_input in (ConfigError, DataError, PKIError, LineageError, ReleaseError, ReceiptError):
        assert issubclass(bad_input, FedgenError) and issubclass(bad_input, ValueError)
        assert not issubclass(bad_input, OperationFailed)
    for bad_state in (LedgerError, BudgetExceeded):
        assert issubclass(bad_state, FedgenError) and not issubclass(bad_state, OperationFailed)
    for failure in (RunFailed, SiteStopped, SimulationFailed, ProcessFailed):
        assert issubclass(failure, OperationFailed) and issubclass(failure, RuntimeError)


def _groups(command: click.Command) -> list[click.Group]:
    if not isinstance(command, click.Group):
        return []
    return [command] + [group for sub in command.commands.values() for group in _groups(sub)]


def test_every_command_group_of_fedgen_reports_through_the_one_mapping():
    groups = _groups(typer.main.get_command(app))
    assert {group.name for group in groups} >= {"certs", "issue", "lineage", "model", "aggregator", "site"}
    assert all(isinstance(group, ReportingGroup) for group in groups), [g.name for g in groups]


def test_a_real_command_reports_a_missing_config_as_bad_input(tmp_path):
    missing = tmp_path / "site.toml"
    result = runner.invoke(app, ["site", "budget", "--config", str(missing)])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {missing}")
