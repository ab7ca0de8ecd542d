"""The site's warm worker: one long-lived process that runs every round of the site.

`fedgen site start` runs it beside the SuperNode (:class:`SiteWorker`): it starts the
worker and waits until it listens before the SuperNode joins, restarts it if it dies
(after 1 s, doubling up to 30 s while it keeps dying young), and stops it when the
SuperNode stops. The worker also stops by itself when the process that started it goes
away (its stdin, a pipe from that process, reaches end of file), so no worker outlives
its site.

The worker keeps in memory what does not change between rounds (`fedgen.client.warm`:
tokenised data, base digest, the model on its device, the CUDA context) and runs rounds
one at a time, each under the site's round lock (`fedgen.client.round.answer_round`).
The privacy ledger is re-read from disk at the start of every round and committed
before the reply is sent, so a worker killed mid-round loses nothing committed, a round
it did not commit spent nothing, and a restarted worker continues from the ledger.

Run by hand: ``python -m fedgen.client.worker --config site.toml``.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from fedgen.config import SiteConfig, load_toml
from fedgen.errors import OperationFailed
from fedgen.protocol import SITE_ERROR
from fedgen.state_files import WORKER_SOCKET_FILE

from .channel import ChannelError, RoundRefused, listen, peer_uid, read_request, send_refusal, send_reply

log = logging.getLogger(__name__)

READY_LINE = b"fedgen-worker-ready\n"
STARTUP_TIMEOUT_SECONDS = 600.0  # importing torch and digesting a large base can take minutes
STOP_TIMEOUT_SECONDS = 30.0
_FIRST_RESTART_DELAY = 1.0
_MAX_RESTART_DELAY = 30.0
_YOUNG_SECONDS = 60.0  # a worker that dies sooner is restarted after a longer delay


class WorkerStartFailed(OperationFailed, RuntimeError):
    """The site's worker exited, or did not get ready, before it listened."""


def _stop(signum: int, frame: FrameType | None) -> None:
    """Stop at once, also in the middle of a round: an operator's stop must not wait for
    training. A round cut short sent nothing, so it spent nothing it did not commit (the
    ledger is written atomically), and its relay reports it failed."""
    raise SystemExit(0)


def serve(site_toml: Path, *, ready_fd: int | None = None, watch_stdin: bool = False) -> None:
    """Listen on the site's worker socket and run the rounds relays send, one at a time.

    ``ready_fd``: a descriptor to write :data:`READY_LINE` to (then closed) once listening.
    ``watch_stdin``: stop when stdin reaches end of file (the starting process is gone).
    """
    site = load_toml(site_toml, SiteConfig)
    Path(site.state_dir).mkdir(parents=True, exist_ok=True)
    path = Path(site.state_dir) / WORKER_SOCKET_FILE
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    if watch_stdin:
        threading.Thread(target=_stop_at_end_of_stdin, daemon=True).start()
    _prepare(site)
    server = listen(path)
    inode = os.stat(path).st_ino
    log.info("site %s: worker %d listening", site.site_id, os.getpid())
    if ready_fd is not None:
        os.write(ready_fd, READY_LINE)
        os.close(ready_fd)
    try:
        while True:
            connection, _ = server.accept()
            with connection:
                _serve_connection(connection, site_toml)
    except SystemExit:
        pass
    finally:
        server.close()
        if path.exists() and os.stat(path).st_ino == inode:  # a successor's socket stays
            path.unlink()
        log.info("site %s: worker %d stopped", site.site_id, os.getpid())


def _prepare(site: SiteConfig) -> None:
    """Digest the base before the first round needs it (a large base takes minutes)."""
    from .warm import PROCESS_CACHE

    base = PROCESS_CACHE.base(site)
    if base is None:
        return
    from fedgen.hf.checkpoint import CheckpointError, read_checkpoint

    try:
        base.digest(read_checkpoint(base.folder))
    except CheckpointError as exc:  # the round reports it to the aggregator, without the path
        log.error("site %s: %s", site.site_id, exc)


def _serve_connection(connection: socket.socket, site_toml: Path) -> None:
    from .round import answer_round  # torch: in the worker, not in the SuperNode that supervises it

    uid = peer_uid(connection)
    if uid != os.getuid():  # the socket is 0600; this holds even if someone widened it
        log.warning("refused a connection from user id %d", uid)
        return
    try:
        run_id, content = read_request(connection)
    except Exception as exc:  # noqa: BLE001 - a broken or foreign request costs nothing
        log.warning("ignored a request that is not a round (%s)", exc)
        return
    started = time.perf_counter()
    try:
        site = load_toml(site_toml, SiteConfig)  # as a ClientApp process would: the current settings
        reply = answer_round(site, content, run_id)
        log.info("site %s: answered a round of run %d in %.2f s", site.site_id, run_id, time.perf_counter() - started)
    except RoundRefused as refused:
        _answer(connection, refused)
        return
    except Exception as exc:  # noqa: BLE001 - reported without detail, like any site error
        log.exception("round failed")
        _answer(connection, RoundRefused(SITE_ERROR, f"{type(exc).__name__} (details in the site's log)"))
        return
    _answer(connection, reply)


def _answer(connection: socket.socket, answer: object) -> None:
    try:
        if isinstance(answer, RoundRefused):
            send_refusal(connection, answer)
        else:
            send_reply(connection, answer)
    except (OSError, ChannelError) as exc:  # the relay is gone; the ledger already holds the round
        log.warning("could not deliver the round's answer (%s)", exc)


def _stop_at_end_of_stdin() -> None:
    while os.read(0, 4096):  # the raw descriptor: a buffered read would hold a lock at exit
        pass
    os.kill(os.getpid(), signal.SIGTERM)


class SiteWorker:
    """The worker process of a site, kept running beside its SuperNode.

    Parameters
    ----------
    site_toml : Path
        The site's configuration file, as the SuperNode's node config names it.
    """

    def __init__(self, site_toml: Path, *, startup_timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        self.site_toml = Path(site_toml)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker and return once it listens.

        Raises
        ------
        WorkerStartFailed
            If it exits or does not get ready within ``startup_timeout``.
        """
        self._spawn()
        self._monitor = threading.Thread(target=self._keep_running, name="fedgen-site-worker", daemon=True)
        self._monitor.start()

    def _spawn(self) -> None:
        read_end, write_end = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "fedgen.client.worker", "--config", str(self.site_toml)]
                + ["--ready-fd", str(write_end), "--watch-stdin"],
                stdin=subprocess.PIPE,
                pass_fds=(write_end,),
            )
        finally:
            os.close(write_end)
        try:
            self._await_ready(process, read_end)
        except WorkerStartFailed:
            _end(process)
            raise
        finally:
            os.close(read_end)
        self.process = process

    def _await_ready(self, process: subprocess.Popen, read_end: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        received = b""
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([read_end], [], [], left)
            if not readable:
                break
            chunk = os.read(read_end, len(READY_LINE))
            if not chunk:  # the worker closed the pipe without a word: it exited
                code = process.wait()
                raise WorkerStartFailed(f"the site's worker exited with code {code} before it was ready (see above)")
            received += chunk
            if received == READY_LINE:
                return
        raise WorkerStartFailed(f"the site's worker was not ready within {self.startup_timeout:g} s")

    def _keep_running(self) -> None:
        delay = _FIRST_RESTART_DELAY
        while not self._stopping.is_set():
            assert self.process is not None
            started = time.monotonic()
            code = self.process.wait()
            if self._stopping.is_set():
                return
            delay = delay * 2 if time.monotonic() - started < _YOUNG_SECONDS else _FIRST_RESTART_DELAY
            delay = min(delay, _MAX_RESTART_DELAY)
            log.error("the site's worker exited with code %s; restarting it in %g s", code, delay)
            if self._stopping.wait(delay):
                return
            try:
                self._spawn()
                self.restarts += 1
            except WorkerStartFailed as exc:
                log.error("%s", exc)

    def stop(self) -> None:
        """Stop the worker (at once, also in the middle of a round)."""
        self._stopping.set()
        if self.process is not None:
            _end(self.process)
        if self._monitor is not None:
            self._monitor.join(timeout=STOP_TIMEOUT_SECONDS)


def _end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdin is not None:
        process.stdin.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedgen.client.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the site's site.toml")
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--watch-stdin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from fedgen.cli.output import log_to_stderr
    from fedgen.sovereignty import apply_sovereign_environment

    apply_sovereign_environment()  # as every launcher does
    log_to_stderr()
    try:
        serve(args.config, ready_fd=args.ready_fd, watch_stdin=args.watch_stdin)
    except (ChannelError, OSError) as exc:
        sys.exit(f"fedgen worker: {exc}")


if __name__ == "__main__":
    from fedgen.client.worker import main as run  # this module under its own name: its logger is fedgen's

    run()
