"""The README's two commands, run by make exactly as the Makefile has them, from a fresh
copy of the repository (its tracked and new files, nothing git ignores), with
``../shared`` beside it as in CI.

The copy's ``.venv`` is this checkout's virtual environment (linked, and declared
up to date with ``make -o``), so the tests do not reinstall torch, and its editable
``fedgen`` is this checkout's code, the same files as the copy's. Everything else is the
newcomer's: the copy's Makefile, recipes, tests and working directory, relative paths.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
STAMP = ".venv/.fedgen-installed"  # the Makefile's install stamp


@pytest.fixture
def fresh_copy(tmp_path: Path) -> Path:
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    copy = tmp_path / "fedgen"
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in this checkout is gone from the next commit too
            target = copy / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            target.chmod(source.stat().st_mode)
    (copy / ".venv").symlink_to(VENV, target_is_directory=True)
    if (ROOT.parent / "shared").is_dir():
        (tmp_path / "shared").symlink_to(ROOT.parent / "shared", target_is_directory=True)
    return copy


def processes_working_in(folder: Path) -> list[str]:
    """``pid args`` of every process whose working directory is ``folder`` or below it."""
    found = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if Path(os.readlink(cwd)).is_relative_to(folder):
                args = (cwd.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{cwd.parent.name} {args}")
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return found


def make(copy: Path, target: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """``make -o STAMP target`` in ``copy``; if it must be abandoned, stopped as Ctrl-C would."""
    with subprocess.Popen(
        ["make", "-o", STAMP, target],
        cwd=copy,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | env,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:  # timed out, or the test was interrupted
                os.killpg(proc.pid, signal.SIGTERM)  # the demo stops what it started on SIGTERM
                try:
                    proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_make_test_runs_the_copys_tests(fresh_copy):
    chosen = "tests/unit/test_config.py::test_example_configs_are_valid"
    proc = make(fresh_copy, "test", 300, PYTEST_ADDOPTS=f"-v -p no:cacheprovider {chosen}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ".venv/bin/python -m pytest" in proc.stdout  # the recipe as the Makefile has it
    assert f"rootdir: {fresh_copy}" in proc.stdout
    assert f"{chosen} PASSED" in proc.stdout and "1 passed" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(1500)  # ~1 min alone on 2 cores; far more on a busy machine
def test_make_demo_runs_the_consortium_from_a_fresh_copy(fresh_copy):
    # The README's `make demo`, shortened through the Makefile's DEMO_ARGS (the full
    # default run is what a newcomer gets; its length is not what this test is about).
    proc = make(fresh_copy, "demo", 1400, DEMO_ARGS="--rounds 2 --local-epochs 0.25")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^\.venv/bin/fedgen demo --rounds 2 --local-epochs 0.25 --out runs/demo-", proc.stdout, re.M)
    assert "fedgen demo" in proc.stdout and "final accuracy" in proc.stdout  # the round table
    rounds = re.findall(r"^round (\d): accuracy [\d.]+ .*sites 3/3", proc.stderr, re.MULTILINE)
    assert rounds == ["1", "2"], proc.stderr[-3000:]
    runs = list((fresh_copy / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("demo-")
    assert (runs[0] / "aggregator" / "state" / "lineage.jsonl").is_file()
    assert len(list((runs[0] / "aggregator" / "state" / "checkpoints").glob("round-0002-*"))) == 1
    assert processes_working_in(fresh_copy) == []  # every process it started was stopped
