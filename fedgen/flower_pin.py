"""The Flower release series fedgen's glue modules are written for.

``client/supernode.py`` and ``server/superlink.py`` reach into Flower internals that
change between minor releases, so both refuse any other series. pyproject's ``flwr``
requirement is what pip installs; a test keeps it equal to `FLOWER_REQUIREMENT`.
"""

from __future__ import annotations

import os

FLOWER_SERIES = (1, 41)  # major, minor
FLOWER_REQUIREMENT = f">={FLOWER_SERIES[0]}.{FLOWER_SERIES[1]},<{FLOWER_SERIES[0]}.{FLOWER_SERIES[1] + 1}"


def check_flower_version(glue: str) -> None:
    """Refuse to run ``glue`` (what needs the pin, for the message) against another Flower series.

    Raises
    ------
    RuntimeError
        If the installed Flower is not of `FLOWER_SERIES`.
    """
    import flwr

    if tuple(int(part) for part in flwr.__version__.split(".")[:2]) != FLOWER_SERIES:
        series = ".".join(map(str, FLOWER_SERIES))
        raise RuntimeError(
            f"fedgen's {glue} is written for Flower {series}.x; found {flwr.__version__}. "
            f"Install flwr{FLOWER_REQUIREMENT}."
        )


# Set to 1 to keep Flower's own polling pace on both sides (the round-overhead benchmark's
# baseline); otherwise fedgen's glue modules take away Flower's polling floor.
STOCK_POLLING_ENV = "FEDGEN_STOCK_FLOWER_POLLING"
# Flower's own setting for how often a SuperExec looks for tasks (seconds; 1.0 in Flower).
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
# A SuperExec polls its own SuperNode or SuperLink over loopback: cheap enough 5 times a second.
SUPEREXEC_POLL_SECONDS = 0.2


def stock_polling() -> bool:
    """Whether fedgen leaves Flower's polling pace alone (``FEDGEN_STOCK_FLOWER_POLLING=1``)."""
    return os.environ.get(STOCK_POLLING_ENV, "") == "1"


def prompt_superexec_polling() -> None:
    """Make the SuperExec that a SuperNode or SuperLink started from this process look for
    tasks every `SUPEREXEC_POLL_SECONDS` (unless stock polling is asked for, or the
    operator set Flower's variable)."""
    if not stock_polling():
        os.environ.setdefault(SUPEREXEC_POLL_ENV, str(SUPEREXEC_POLL_SECONDS))
