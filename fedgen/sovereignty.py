"""No phone-home: the environment every fedgen process and its children run in.

Flower checks for updates, sends telemetry and runs ``uv sync`` against a package index
for every run; Ray reports usage. A sovereign deployment makes no outbound call except
site -> aggregator, so every launcher, simulation and test sets these switches.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

NO_PHONE_HOME = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def sovereign_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with phone-home off and this
    interpreter's scripts first on PATH (Flower starts ``flower-superexec`` by name)."""
    env = dict(os.environ if base is None else base)
    env.update(NO_PHONE_HOME)
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")])
    return env


def apply_sovereign_environment() -> None:
    """Apply `sovereign_environment` to this process (inherited by its children)."""
    os.environ.update(sovereign_environment())
