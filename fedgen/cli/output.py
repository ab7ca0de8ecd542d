"""How every `fedgen` command reports: errors to stderr with an exit code, one style.

Exit codes have one home, `exit_code`: 2 for a problem the user can fix (`FedgenError`),
1 for work that failed on the way (`OperationFailed`), 130 for an interrupt. Every command
group is a `ReportingGroup`, so a command raises and never catches to report. Any other
exception is a bug: it propagates with its traceback instead of passing for bad input.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from ..errors import FedgenError, OperationFailed

err = Console(stderr=True)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def exit_code(error: FedgenError) -> int:
    """The exit code that reports ``error``: 1 for a failed operation, 2 for bad input."""
    return EXIT_FAILED if isinstance(error, OperationFailed) else EXIT_BAD_INPUT


class ReportingGroup(TyperGroup):
    """A command group whose commands' user-facing errors become ``error: …`` and an exit code."""

    #: Further exceptions this group's commands report as bad input.
    bad_input: tuple[type[Exception], ...] = ()

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FedgenError as error:
            fail(str(error), code=exit_code(error))
        except self.bad_input as error:
            fail(str(error))
        except KeyboardInterrupt:
            fail("interrupted", code=EXIT_INTERRUPTED)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad input; 1: a failed run)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """Print ``warning: message`` on stderr; the command goes on."""
    err.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def log_to_stderr(level: int = logging.INFO) -> None:
    """Send fedgen's log records to stderr, timestamped: a long-running process's log
    (the aggregator's refusals, a site's reasons to stop)."""
    logger = logging.getLogger("fedgen")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
