"""The errors a user can act on, as opposed to bugs.

Every problem a user can fix (a config field, a data file, a certificate, the privacy
budget, the ledger) raises a `FedgenError` whose message names the file, field or line
and the cause. Work that started from good input and then failed (a run, a site, a
process of the consortium) raises an `OperationFailed`. The command line maps these two
to exit codes in one place (`fedgen.cli.output`); anything else is a bug and surfaces
as a traceback, never as "bad input".
"""

from __future__ import annotations


class FedgenError(Exception):
    """A problem the user can fix; the message names the place (file, field, line) and cause."""


class InputError(FedgenError, ValueError):
    """An argument or option that cannot be used as given (e.g. an output folder in use)."""


class OperationFailed(FedgenError):
    """Work that started from good input failed on the way: a run, a site, a process."""


class ProcessFailed(OperationFailed, RuntimeError):
    """A process of the consortium stopped before it was asked to, or never came up; the message
    names its log."""
