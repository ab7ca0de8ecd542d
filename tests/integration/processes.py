"""The processes a test started, found in /proc: for tests that must leave nothing behind.

Other people run Flower on the same machine, so "every Flower process" is not "this test's
processes". Each test runs with a mark of its own in its environment (the autouse
``process_tree`` fixture in tests/conftest.py); every process the test starts inherits it,
and so does everything those start in turn, also once a parent has died and its children
were re-parented out of the tree (Flower's SuperExec and ServerApp, for one, start in
sessions of their own). A process belongs to the test if it carries the mark or descends
from one that does.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

MARK_VARIABLE = "FEDGEN_TEST_PROCESS_TREE"


@dataclass(frozen=True)
class _Process:
    pid: int
    parent: int
    session: int
    zombie: bool
    environment: frozenset[bytes]
    args: str


def _read(pid: str) -> _Process | None:
    """One process from /proc, or None if it is gone (another user's shows no environment)."""
    folder = Path("/proc") / pid
    try:
        stat = (folder / "stat").read_text()
        args = (folder / "cmdline").read_bytes()
    except OSError:
        return None
    try:
        environment = (folder / "environ").read_bytes()
    except OSError:
        environment = b""
    # "pid (command) state ppid pgrp session ...": the command may itself hold spaces or ")".
    state, parent, _, session = stat[stat.rindex(")") + 2 :].split()[:4]
    return _Process(
        pid=int(pid),
        parent=int(parent),
        session=int(session),
        zombie=state == "Z",
        environment=frozenset(environment.split(b"\0")),
        args=args.replace(b"\0", b" ").decode(errors="replace").strip(),
    )


def _live_processes() -> list[_Process]:
    found = (_read(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [p for p in found if p is not None and not p.zombie]


@dataclass(frozen=True)
class ProcessTree:
    """Every process started under ``mark``: by a test, or by anything the test started.

    Parameters
    ----------
    mark : str
        The value of ``MARK_VARIABLE`` in the environment of the test's processes.
    """

    mark: str

    @classmethod
    def new(cls) -> ProcessTree:
        return cls(uuid.uuid4().hex)

    def running(self) -> dict[int, str]:
        """``{pid: command line}`` of the tree's live processes (this test process aside)."""
        processes = _live_processes()
        tag = f"{MARK_VARIABLE}={self.mark}".encode()
        members = {p.pid for p in processes if tag in p.environment}
        children = defaultdict(list)
        for p in processes:
            children[p.parent].append(p.pid)
        # Descendants too: a child started with a cleaned environment is still the test's.
        frontier = list(members)
        while frontier:
            for child in children[frontier.pop()]:
                if child not in members:
                    members.add(child)
                    frontier.append(child)
        members.discard(os.getpid())
        return {p.pid: p.args for p in processes if p.pid in members}

    def wait_until_ended(self, timeout: float = 20.0) -> dict[int, str]:
        """Poll until the tree is empty; what is still running after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (left := self.running()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left


def processes_in_session(session: int) -> dict[int, str]:
    """``{pid: command line}`` of the live processes in session ``session``."""
    return {p.pid: p.args for p in _live_processes() if p.session == session}


def processes_mentioning(text: str) -> list[str]:
    """``pid args`` of every other process whose command line contains ``text``."""
    return [f"{p.pid} {p.args}" for p in _live_processes() if text in p.args and p.pid != os.getpid()]
