"""One measurement in a fresh Python process, so that its peak memory and its imports are
its own: ``python SCRIPT --worker ARGS...``, whose last line on stdout is a JSON object."""

from __future__ import annotations

import json
import subprocess
import sys


def run_worker(script: str, *args: object) -> dict:
    """Run ``script``'s worker with ``args`` and return the JSON object it printed last.

    Raises
    ------
    RuntimeError
        If the worker fails, with the end of its stderr.
    """
    command = [sys.executable, script, "--worker", *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
