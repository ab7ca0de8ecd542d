"""Processes started in their own sessions and stopped as groups, and the ports they listen on.

The demo and the tests that run a consortium of real processes start and stop them here:
each process leads its own session, so stopping it reaches every child it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ProcessFailed
from .sovereignty import sovereign_environment

STARTUP_TIMEOUT = 60.0


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = STARTUP_TIMEOUT) -> None:
    """Wait until ``port`` accepts connections; fail with the log tail if ``process`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ProcessFailed(
                f"process exited with {process.returncode}; log {log}:\n" + log.read_text(errors="replace")[-2000:]
            )
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise ProcessFailed(f"nothing listened on port {port} after {timeout:.0f} s; see {log}")


class ProcessGroup:
    """Processes started in their own sessions, stopped together with their children."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        """Start ``args`` logging to ``<log_dir>/<name>.log``; ``env`` defaults to the sovereign one."""
        log = self.log_dir / f"{name}.log"
        with open(log, "wb") as handle:
            process = subprocess.Popen(
                args,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=sovereign_environment() if env is None else env,
                start_new_session=True,
            )
        self.processes.append(process)
        self.logs.append(log)
        return process, log

    def check_alive(self) -> None:
        """Raise if a process stopped before it was asked to, with the end of its log."""
        for process, log in zip(self.processes, self.logs):
            if process.poll() is not None:
                raise ProcessFailed(
                    f"{log.stem} exited with code {process.returncode}; {log}:\n"
                    + log.read_text(errors="replace")[-2000:]
                )

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process group, then SIGKILL what is left after ``grace`` seconds."""
        for process in self.processes:
            signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            signal_group(process, signal.SIGKILL)  # also children left behind in the group
            process.wait()
        self.processes.clear()
        self.logs.clear()


def signal_group(process: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the session ``process`` leads; a group already gone is no error."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C so cleanup runs either way, and answer Ctrl-C even when
    this process was started with SIGINT ignored (Python then leaves it ignored: a job a
    script started in the background, some test and CI runners)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
