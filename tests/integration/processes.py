"""What is running on this machine, from /proc: for tests that must leave nothing behind."""

import os
import time
from pathlib import Path


def processes_mentioning(text: str) -> list[str]:
    """``pid args`` of every other process whose command line contains ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args and str(os.getpid()) != cmdline.parent.name:
            found.append(f"{cmdline.parent.name} {args}")
    return found


def flower_processes() -> set[str]:
    """Pids of Flower's helper processes (SuperExec, ServerApp, ClientApp) running now."""
    return {entry.split(" ", 1)[0] for name in ("flower-superexec", "flwr-") for entry in processes_mentioning(name)}


def wait_for_flower_processes_to_end(before: set[str], timeout: float = 20.0) -> set[str]:
    """Flower helpers started since ``before`` still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := flower_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left
