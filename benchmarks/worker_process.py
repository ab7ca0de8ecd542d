"""What the benchmarks' measurements share: one measurement in a fresh Python process, so
that its peak memory and its imports are its own (``python SCRIPT --worker ARGS...``, whose
last line on stdout is a JSON object), the process's memory, and a timed training step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable


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


def rss_mib() -> float:
    """This process's resident set now, in MiB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed_step(module, optimizer, criterion, ids, labels) -> Callable[[], float]:  # noqa: ANN001 - torch objects
    """A training step on one batch that returns its own duration in seconds."""

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        criterion(module(ids), labels).backward()
        optimizer.step()
        return time.perf_counter() - start

    return step
