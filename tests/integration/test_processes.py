"""The process tree a test checks: its own processes, wherever they end up, and nobody else's."""

import os
import signal
import subprocess
import sys

from .processes import MARK_VARIABLE, processes_in_session

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_grandchild_in_its_own_session_is_found_after_its_parent_died(process_tree):
    # Like Flower's SuperExec: started detached, in a new session, by a parent that then exits.
    parent = subprocess.run(
        [
            sys.executable,
            "-c",
            "import subprocess; print(subprocess.Popen("
            f"{SLEEPER!r}, start_new_session=True, stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL).pid)",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    orphan = int(parent.stdout)
    try:
        assert processes_in_session(orphan) == {orphan: " ".join(SLEEPER)}  # alive, re-parented
        assert set(process_tree.running()) == {orphan}
    finally:
        _kill(orphan)
    assert process_tree.wait_until_ended() == {}


def test_a_child_that_dropped_the_mark_is_still_found_by_descent(process_tree):
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess; child = subprocess.Popen("
            f"{SLEEPER!r}, env={{}}); print(child.pid, flush=True); child.wait()",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        child = int(parent.stdout.readline())
        assert set(process_tree.running()) == {parent.pid, child}
    finally:
        _kill(child)
        parent.wait(timeout=60)
        parent.stdout.close()
    assert process_tree.running() == {}


def test_flower_processes_of_others_on_the_machine_are_not_the_tests(process_tree):
    unmarked = {k: v for k, v in os.environ.items() if k != MARK_VARIABLE}
    # Named like Flower's helpers, as another engineer's test run would have them.
    disguise = [sys.executable, "-c", "import time; time.sleep(120)", "flower-superexec", "flwr-serverapp"]
    others = [
        subprocess.Popen(disguise, env=unmarked, start_new_session=True),
        subprocess.Popen(disguise, env={**unmarked, MARK_VARIABLE: "another-test"}, start_new_session=True),
    ]
    try:
        assert process_tree.running() == {}
    finally:
        for other in others:
            other.kill()
            other.wait()
