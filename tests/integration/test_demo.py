"""`fedgen demo`: a consortium of real processes over mutual TLS, and nothing calling home."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .processes import processes_mentioning

pytestmark = pytest.mark.slow
CHANCE = 451 / 888


def test_tripwire_catches_an_outbound_call(tripwire):
    server, env = tripwire
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import urllib.request\ntry:\n"
            "    urllib.request.urlopen('http://example.org/', timeout=5)\nexcept Exception:\n    pass",
        ],
        env=env,
        timeout=30,
    )
    assert any(b"example.org" in attempt for attempt in server.attempts)


def test_demo_runs_dp_rounds_over_mtls_calls_nobody_and_stops_everything(tmp_path, tripwire, process_tree):
    server, env = tripwire
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedgen.cli",
            "demo",
            "--sites",
            "2",
            "--rounds",
            "2",
            "--local-epochs",
            "0.5",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    first, second = (r["epsilon"] for r in summary["rounds"])
    assert set(first) == set(second) == {"site-0", "site-1"}
    assert all(0 < first[s] < second[s] <= 8.0 + 1e-9 for s in first)
    for entry in summary["rounds"]:  # round timing: the aggregator's wall time covers each site's training
        trained = [s["train_seconds"] for s in entry["sites"] if s["status"] == "trained"]
        assert sorted(s["site"] for s in entry["sites"]) == ["site-0", "site-1"] and len(trained) == 2
        assert entry["wall_seconds"] > max(trained) >= min(trained) > 0
    assert summary["final_accuracy"] > CHANCE + 0.1
    assert len(list(out.glob("aggregator/state/checkpoints/round-*.safetensors"))) == 3
    assert server.attempts == []  # no outbound connection was tried
    assert processes_mentioning(str(out)) == []
    assert process_tree.running() == {}  # Flower's helpers too, in their own sessions
    for site in ("site-0", "site-1"):  # each site trained in its own process, with its own ledger
        assert (out / "sites" / site / "state" / "privacy-ledger.json").is_file()
    # The aggregator's lineage holds both rounds, every update signed by its site's certificate.
    # Each site witnessed the ledger head of both rounds: its receipts match the ledger.
    receipts = [arg for site in ("site-0", "site-1") for arg in ("--receipts", str(out / "sites" / site / "state"))]
    verified = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedgen.cli",
            "lineage",
            "verify",
            "--config",
            str(out / "aggregator" / "aggregator.toml"),
            *receipts,
        ],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stderr
    assert "2 checkpoint digests and 4 site signatures checked" in verified.stdout
    assert "receipts: 4 checked: 4 witnessed" in verified.stdout


def test_demo_stops_every_process_on_ctrl_c(tmp_path, process_tree):
    out = tmp_path / "demo"
    demo = subprocess.Popen(
        [sys.executable, "-m", "fedgen.cli", "demo", "--sites", "2", "--rounds", "5", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # Started with SIGINT ignored, as a background job of a script (and, it turned out, a
        # process of this suite) starts it: Python keeps it ignored unless the demo takes it back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(demo.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("submitted" in line for line in said):
            assert demo.poll() is None, "".join(said)[-3000:]
            assert time.monotonic() < deadline, "the demo did not submit its run within 300 s"
            time.sleep(0.1)
        assert len(processes_mentioning(str(out))) >= 3  # aggregator and two sites are up
        demo.send_signal(signal.SIGINT)
        try:
            code = demo.wait(timeout=120)
        except subprocess.TimeoutExpired:  # say what the demo was doing (seen once, in a loaded suite)
            raise AssertionError(f"no exit 120 s after SIGINT; {_signal_state(demo.pid)}; said: {said[-5:]}") from None
        assert code == 130
    finally:
        if demo.poll() is None:
            demo.kill()
        for line in processes_mentioning(str(out)):  # a failed stop must not leave a consortium running
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
    reader.join(timeout=10)
    assert "all processes stopped" in "".join(said)
    assert processes_mentioning(str(out)) == []
    assert process_tree.running() == {}


def _signal_state(pid: int) -> str:
    """The kernel's view of a process: its ignored, blocked and caught signals and where it waits."""
    proc = Path("/proc") / str(pid)
    try:
        status = dict(line.split(":\t", 1) for line in (proc / "status").read_text().splitlines() if ":\t" in line)
        wchan = (proc / "wchan").read_text()
    except OSError as exc:
        return f"unreadable ({exc})"
    return f"SigIgn {status.get('SigIgn')} SigBlk {status.get('SigBlk')} SigCgt {status.get('SigCgt')} wchan {wchan}"
