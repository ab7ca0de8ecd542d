"""The Flower release series fedgen's glue modules are written for.

``client/supernode.py`` and ``server/superlink.py`` reach into Flower internals that
change between minor releases, so both refuse any other series. pyproject's ``flwr``
requirement is what pip installs; a test keeps it equal to `FLOWER_REQUIREMENT`.
"""

from __future__ import annotations

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
