"""The relay-to-worker channel: a 0600 Unix socket that carries a round in Flower's own encoding,
refuses other users at both ends, and never mistakes a stale socket for a worker."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import threading
from pathlib import Path

import pytest
from flwr.app import RecordDict

from fedgen.client.channel import (
    ChannelError,
    RoundRefused,
    WorkerUnavailable,
    listen,
    peer_uid,
    read_request,
    request_round,
    send_refusal,
    send_reply,
)
from fedgen.params import digest, record_to_arrays
from fedgen.protocol import ARRAYS_KEY, BUDGET_REFUSED, CONFIG_KEY

from ..conftest import train_message

NOBODY = 65534


def _serve_once(server: socket.socket, answer) -> list:
    """Accept one connection in a thread; ``answer(connection, run_id, content)`` replies."""
    seen: list = []

    def run() -> None:
        connection, _ = server.accept()
        with connection:
            try:
                run_id, content = read_request(connection)
            except ChannelError as exc:
                seen.append(exc)
                return
            seen.append((run_id, content))
            answer(connection, run_id, content)

    thread = threading.Thread(target=run)
    thread.start()
    seen.append(thread)
    return seen


def test_a_round_and_a_refusal_cross_the_socket_intact(tmp_path):
    path = tmp_path / "worker.sock"
    server = listen(path)
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    sent = train_message()
    seen = _serve_once(server, lambda connection, run_id, content: send_reply(connection, content))
    run_id = 2**64 - 5  # Flower run ids are unsigned 64-bit
    echoed = request_round(path, run_id, sent)
    seen[0].join()
    assert seen[1][0] == run_id
    assert digest(record_to_arrays(echoed[ARRAYS_KEY])) == digest(record_to_arrays(sent[ARRAYS_KEY]))
    assert dict(echoed[CONFIG_KEY]) == dict(sent[CONFIG_KEY])

    reason = "refusing round: ε would rise from 7.9 to 8.2, past the site's ceiling 8"
    seen = _serve_once(server, lambda c, r, content: send_refusal(c, RoundRefused(BUDGET_REFUSED, reason)))
    with pytest.raises(RoundRefused) as refused:
        request_round(path, 1, sent)
    seen[0].join()
    assert (refused.value.code, refused.value.reason) == (BUDGET_REFUSED, reason)

    seen = _serve_once(server, lambda *args: None)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as foreign:
        foreign.connect(str(path))
        foreign.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        seen[0].join()
    assert isinstance(seen[1], ChannelError)  # not a frame: refused before anything is decoded
    server.close()


def test_a_live_socket_is_kept_and_a_stale_one_replaced(tmp_path):
    path = tmp_path / "worker.sock"
    server = listen(path)
    with pytest.raises(ChannelError, match="a worker already serves this site"):
        listen(path)
    server.close()  # as a killed worker leaves it: the file stays, nobody listens
    assert path.exists()
    with pytest.raises(WorkerUnavailable):
        request_round(path, 1, train_message())
    listen(path).close()
    with pytest.raises(WorkerUnavailable):
        request_round(tmp_path / "never-started.sock", 1, train_message())


def test_a_state_folder_deeper_than_a_socket_address_still_works(tmp_path):
    folder = tmp_path / ("x" * 120) / "state"  # the socket's path is far past 107 bytes
    folder.mkdir(parents=True)
    path = folder / "worker.sock"
    server = listen(path)
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    sent = train_message()
    seen = _serve_once(server, lambda connection, run_id, content: send_reply(connection, content))
    echoed = request_round(path, 7, sent)
    seen[0].join()
    assert seen[1][0] == 7 and dict(echoed[CONFIG_KEY]) == dict(sent[CONFIG_KEY])
    with pytest.raises(ChannelError, match="a worker already serves this site"):
        listen(path)
    server.close()


def _try_as_nobody(path: Path) -> str:
    """What sending a round to ``path`` does for another user: a forked child that drops to nobody."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                request_round(path, 1, RecordDict())
                outcome = "sent"
            except (PermissionError, ChannelError) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            os.write(write_end, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another user needs root")
def test_another_user_cannot_connect_and_each_end_checks_the_others_user():
    folder = Path(tempfile.mkdtemp(prefix="fedgen-socket-"))
    try:
        folder.chmod(0o755)  # another user may reach the folder: only the socket's mode stops them
        path = folder / "worker.sock"
        server = listen(path)
        assert _try_as_nobody(path).startswith("PermissionError")

        # Even through a socket someone widened, each end sees the other's user from the kernel.
        path.chmod(0o666)
        outcome = _try_as_nobody(path)
        assert outcome.startswith("ChannelError") and "held by another user" in outcome
        connection, _ = server.accept()
        with connection:
            assert peer_uid(connection) == NOBODY  # what the worker checks before reading a byte
        server.close()
    finally:
        shutil.rmtree(folder)
