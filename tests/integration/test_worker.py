"""The site's warm worker as real processes: the ClientApp relays to it, it serialises rounds,
killed mid-round (SIGKILL) it loses nothing committed, spends nothing twice and, restarted
by its supervisor, continues from the privacy ledger; stopped mid-round, it exits at once."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
from flwr.app import Context, Message, MessageType, Metadata, RecordDict
from opacus.accountants import RDPAccountant

from fedgen.client.app import make_client_app, relayed_round
from fedgen.client.channel import WorkerLost, request_round
from fedgen.client.ledger import PrivacyLedger
from fedgen.client.worker import SiteWorker
from fedgen.config import SiteConfig, load_toml
from fedgen.protocol import BUDGET_REFUSED, METRICS_KEY, TrainReport
from fedgen.state_files import ROUND_LOCK_FILE, WORKER_SOCKET_FILE

from ..conftest import train_message, write_site

DEADLINE = 300.0


def _poll(condition, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _epsilon(history) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=1e-5)


def _ledger(site: SiteConfig) -> PrivacyLedger:
    return PrivacyLedger.open(site.state_dir, accountant="rdp", delta=1e-5)


def _round_lock_held(site: SiteConfig) -> bool:
    with open(site.state_dir / ROUND_LOCK_FILE, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _call_app(site: SiteConfig, content: RecordDict) -> Message:
    app = make_client_app(lambda context: site, run_round=relayed_round)
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=5,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=600.0,
        message_type=MessageType.TRAIN,
    )
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    return app(Message(metadata=metadata, content=content), context)


@pytest.fixture
def started(tmp_path):
    toml = write_site(tmp_path / "site-a")
    worker = SiteWorker(toml)
    worker.start()
    yield load_toml(toml, SiteConfig), worker
    worker.stop()


def test_the_client_app_relays_rounds_which_the_worker_serialises(started, flower_task, process_tree):
    site, worker = started
    socket_path = site.state_dir / WORKER_SOCKET_FILE
    assert stat.S_IMODE(os.lstat(socket_path).st_mode) == 0o600
    # Two rounds at once (two ClientApp processes of one SuperNode): both train, one after the
    # other, and the second composes on the first's committed spend.
    replies: dict[int, RecordDict] = {}
    threads = [
        threading.Thread(target=lambda r=r: replies.__setitem__(r, request_round(socket_path, 1, train_message(r))))
        for r in (1, 2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ledger = _ledger(site)
    assert len(ledger.rounds) == 2
    epsilons = sorted(TrainReport.from_record(reply[METRICS_KEY]).epsilon for reply in replies.values())
    assert epsilons == pytest.approx([r["epsilon_after"] for r in ledger.rounds])
    assert epsilons[0] < epsilons[1] == pytest.approx(_epsilon(ledger.history))

    # The ClientApp relays; the worker's refusal arrives with the code and reason the site's own process gives.
    reply = _call_app(site, train_message(3))
    assert not reply.has_error() and len(_ledger(site).rounds) == 3
    tight = site.model_copy(update={"privacy": site.privacy.model_copy(update={"epsilon": 0.01})})
    site.state_dir.parent.joinpath("site.toml").write_text(
        site.state_dir.parent.joinpath("site.toml").read_text().replace("epsilon = 8.0", "epsilon = 0.01")
    )  # the worker reads the site's settings each round, as a ClientApp process does
    refused = _call_app(tight, train_message(4))
    assert refused.has_error() and refused.error.code == BUDGET_REFUSED
    assert (
        refused.error.reason.startswith("site site-a: privacy budget exhausted")
        and "ceiling 0.01" in refused.error.reason
    )
    assert str(site.state_dir.parent) not in refused.error.reason
    assert worker.process is not None and worker.process.poll() is None and worker.restarts == 0


def _start_long_round(site: SiteConfig) -> tuple[threading.Thread, list]:
    """Relay a round 2 of minutes of training; return once the worker holds the round lock.
    The list receives the relay's WorkerLost, if the round is lost."""
    lost: list = []

    def long_round() -> None:
        try:
            request_round(site.state_dir / WORKER_SOCKET_FILE, 1, train_message(2, local_epochs=400))
        except WorkerLost as exc:
            lost.append(exc)

    relay = threading.Thread(target=long_round)
    relay.start()
    _poll(lambda: _round_lock_held(site), "the worker to start round 2")
    return relay, lost


def test_a_worker_killed_mid_round_loses_nothing_committed_and_continues_after_restart(started, process_tree):
    site, worker = started
    socket_path = site.state_dir / WORKER_SOCKET_FILE
    first = TrainReport.from_record(request_round(socket_path, 1, train_message(1))[METRICS_KEY])
    committed = _ledger(site)
    assert len(committed.rounds) == 1

    # A long round 2: killed as soon as it holds the round lock, long before it can commit.
    relay, outcome = _start_long_round(site)
    killed = worker.process
    os.kill(killed.pid, signal.SIGKILL)
    relay.join()
    assert len(outcome) == 1  # the relay reports the lost round; it does not run it again
    assert _ledger(site).history == committed.history and _ledger(site).rounds == committed.rounds

    _poll(lambda: worker.restarts == 1, "the supervisor to restart the worker")
    assert worker.process is not killed and worker.process.poll() is None
    second = TrainReport.from_record(request_round(socket_path, 1, train_message(2))[METRICS_KEY])
    ledger = _ledger(site)
    assert [r["round"] for r in ledger.rounds] == [1, 2]
    assert first.epsilon == pytest.approx(ledger.rounds[0]["epsilon_after"])
    assert second.epsilon == pytest.approx(_epsilon(ledger.history))
    assert second.epsilon > first.epsilon


def test_a_worker_stopped_mid_round_exits_at_once_and_commits_nothing(started, process_tree):
    site, worker = started
    socket_path = site.state_dir / WORKER_SOCKET_FILE
    request_round(socket_path, 1, train_message(1))
    committed = _ledger(site)
    relay, outcome = _start_long_round(site)
    stopped = worker.process
    worker.stop()  # SIGTERM, as `fedgen site start` does on Ctrl-C or a service stop
    relay.join()
    assert stopped.returncode == 0  # it left by itself, not by the SIGKILL that follows a 30 s grace
    assert len(outcome) == 1
    assert _ledger(site).history == committed.history and _ledger(site).rounds == committed.rounds
    assert not socket_path.exists() and worker.restarts == 0


def test_a_worker_whose_site_process_dies_stops_by_itself(tmp_path, process_tree):
    toml = write_site(tmp_path / "site-a")
    script = (
        "import sys\nfrom fedgen.client.worker import SiteWorker\n"
        "worker = SiteWorker(sys.argv[1]); worker.start()\n"
        "print(worker.process.pid, flush=True); sys.stdin.read()\n"
    )
    site_process = subprocess.Popen(
        [sys.executable, "-c", script, str(toml)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    worker_pid = int(site_process.stdout.readline())
    site_process.kill()  # no chance to stop its worker
    site_process.wait()
    _poll(lambda: not process_tree.running(), "the orphaned worker to stop", timeout=60)
    assert worker_pid not in process_tree.running()
    assert not (tmp_path / "site-a" / "state" / WORKER_SOCKET_FILE).exists()
