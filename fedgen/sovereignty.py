"""No phone-home: the environment every fedgen process and its children run in.

Flower checks for updates, sends telemetry and runs ``uv sync`` against a package index
for every run; Ray reports usage, and looks for this machine's address by opening a
route to 8.8.8.8 and then serves on that address. A sovereign deployment makes no
outbound call except site -> aggregator, so fedgen switches all of that off in its own
environment, which every process it starts inherits.

Flower reads its telemetry switch, and Ray its cluster switch, once, when they are
imported. So ``import fedgen`` itself sets the switches (fedgen/__init__.py runs
`switch_off_phone_home` before anything else), and every entry point (the ``fedgen``
command, ``python -m fedgen.cli``, ``fedgen.simulate`` in a notebook, the ClientApp and
ServerApp modules Flower loads) imports ``fedgen`` first. If Flower or Ray was imported
before fedgen without the switches (a notebook that ran ``import flwr`` first), fedgen
cannot undo what they read: importing fedgen warns (`SovereigntyWarning`), and anything
that would start Flower from that process (`apply_sovereign_environment`, called by every
launcher and by the simulation) refuses with `SovereigntyError`.

Tested by tests/integration/test_egress.py: each launcher, started by hand, runs under a
syscall trace that fails on any call outside the consortium's loopback, DNS included.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FedgenError

NO_PHONE_HOME = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's single-machine mode (its default on macOS and Windows): loopback only, no
    # 8.8.8.8 route probe. A simulation never spans machines.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Hugging Face: models and tokenizers load from the site's own folders, never a hub.
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
# Packages that read a switch once, when imported (one imported before fedgen set the
# switch read whatever the environment held then), and what they do if it was unset.
READ_AT_IMPORT = {
    "flwr": ("FLWR_TELEMETRY_ENABLED", "Flower sends telemetry to telemetry.flower.ai"),
    "ray": ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "Ray probes a route to 8.8.8.8 and serves on this machine's address"),
    "huggingface_hub": ("HF_HUB_OFFLINE", "the Hugging Face Hub client may call huggingface.co"),
}
TOO_LATE = (
    "{packages} imported before fedgen, without fedgen's no-phone-home switches: in this process "
    "{consequences}, and fedgen cannot switch that off any more. Import fedgen first (restart "
    "the notebook kernel), or set {switches} before Python starts."
)


def _read_too_early() -> tuple[str, ...]:
    """Packages already imported that read their switch from an environment without it."""
    return tuple(
        package
        for package, (switch, _) in READ_AT_IMPORT.items()
        if package in sys.modules and os.environ.get(switch) != NO_PHONE_HOME[switch]
    )


# Taken when fedgen is first imported, before it sets anything (fedgen/__init__.py
# imports this module first): later, the environment no longer tells.
READ_TOO_EARLY = _read_too_early()


class SovereigntyWarning(UserWarning):
    """This process was set up to phone home before fedgen could prevent it."""


class SovereigntyError(FedgenError, RuntimeError):
    """fedgen refuses to start Flower or Ray in a process that would phone home."""


def switch_off_phone_home() -> None:
    """Set `NO_PHONE_HOME` in this process's environment; warn if Flower or Ray already read it."""
    os.environ.update(NO_PHONE_HOME)
    problem = too_late()
    if problem is not None:
        warnings.warn(problem, SovereigntyWarning, stacklevel=2)


def too_late() -> str | None:
    """Why this process would phone home whatever fedgen sets now, or None."""
    if not READ_TOO_EARLY:
        return None
    packages = " and ".join(READ_TOO_EARLY) + (" were" if len(READ_TOO_EARLY) > 1 else " was")
    consequences = " and ".join(READ_AT_IMPORT[package][1] for package in READ_TOO_EARLY)
    switches = " ".join(f"{name}={value}" for name, value in NO_PHONE_HOME.items())
    return TOO_LATE.format(packages=packages, consequences=consequences, switches=switches)


def sovereign_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with phone-home off and this
    interpreter's scripts first on PATH (Flower starts ``flower-superexec`` by name)."""
    env = dict(os.environ if base is None else base)
    env.update(NO_PHONE_HOME)
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")])
    return env


def apply_sovereign_environment() -> None:
    """Apply `sovereign_environment` to this process (inherited by its children).

    Raises
    ------
    SovereigntyError
        If Flower or Ray was imported before fedgen could switch its phone-home off.
    """
    problem = too_late()
    if problem is not None:
        raise SovereigntyError(problem)
    os.environ.update(sovereign_environment())


@contextmanager
def ray_without_api_server() -> Iterator[None]:
    """Ray started inside this block starts no API server process (Ray 2.55).

    With the dashboard off, that process only hosts Ray's usage-stats module, which
    probes cloud metadata services (169.254.169.254 and a DNS lookup of
    metadata.google.internal) when it starts, even with usage stats disabled. Ray
    already runs without it when it fails to start; nothing else is lost.
    """
    from ray._private.node import Node

    start_api_server = Node.start_api_server
    Node.start_api_server = _start_no_api_server
    try:
        yield
    finally:
        Node.start_api_server = start_api_server


def _start_no_api_server(self: object, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
    """Stands in for Ray's ``Node.start_api_server``: starts nothing."""
