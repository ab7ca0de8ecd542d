"""The local channel between a site's ClientApp relay and its warm worker.

A Unix stream socket in the site's state folder, created 0600 (only the site's user can
open it), whose two ends also check each other's user id from the kernel (SO_PEERCRED):
a socket a wider permission or another user's process reached is refused either way. A
socket address holds at most 107 bytes; a deeper state folder is reached through a
descriptor of the folder (``/proc/self/fd/N/worker.sock``), so its depth does not matter.

One connection carries one round: a request frame (run id, the message content), then
one reply frame (the reply content, or the refusal's error code and reason). Content
travels in Flower's own wire encoding of a RecordDict (its protobuf, through
``flwr.common.serde``): nothing is unpickled. A frame is a 4-byte magic, a 1-byte kind
and an 8-byte length, then that many bytes.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

MAGIC = b"FGW1"
REQUEST, REPLY, REFUSAL = 1, 2, 3
MAX_FRAME_BYTES = 1 << 34  # a bound on what a peer can make the other allocate
_HEADER = struct.Struct("!4sBQ")
_RUN_ID = struct.Struct("!Q")
_CODE = struct.Struct("!q")
_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
# sockaddr_un holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107
# Flower's wire type for a RecordDict, reached through its serialiser (not its proto package).
_RECORD_DICT_PROTO = type(recorddict_to_proto(RecordDict()))


class ChannelError(RuntimeError):
    """The channel broke or carried something that is not a frame of this protocol."""


class WorkerUnavailable(ChannelError):
    """No worker accepted the connection: nothing was sent."""


class WorkerLost(ChannelError):
    """The worker went away after the request was sent, before its reply came back."""


class RoundRefused(Exception):  # noqa: N818 - what it reports, as the aggregator receives it
    """A round ended without an update: its Flower error code and a reason that names no path."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def encode_content(content: RecordDict) -> bytes:
    return recorddict_to_proto(content).SerializeToString()


def decode_content(data: bytes) -> RecordDict:
    return recorddict_from_proto(_RECORD_DICT_PROTO.FromString(data))


@contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """The address to bind or connect ``path`` by: the path itself, or, if it is longer
    than a socket address may be, the same file reached through a descriptor of its folder
    (valid while the context lasts)."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


def listen(path: Path) -> socket.socket:
    """A listening socket at ``path``, 0600 from its creation on.

    A socket file left by a worker that died is replaced; one that a live worker still
    answers on is not.

    Raises
    ------
    ChannelError
        If another worker already listens there.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        try:
            connect(path).close()
        except WorkerUnavailable:
            path.unlink()
        else:
            raise ChannelError(f"{path}: a worker already serves this site")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)  # no window in which the socket is open to others
    try:
        with socket_address(path) as address:
            server.bind(address)
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    if stat.S_IMODE(os.lstat(path).st_mode) != 0o600:
        raise ChannelError(f"{path}: could not make the socket 0600")
    server.listen(16)
    return server


def connect(path: Path) -> socket.socket:
    """Connect to the worker at ``path`` and check that it runs as this user.

    Raises
    ------
    WorkerUnavailable
        If no worker listens there.
    ChannelError
        If the process that holds the socket belongs to another user.
    """
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with socket_address(Path(path)) as address:
            client.connect(address)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        client.close()
        raise WorkerUnavailable(f"no worker listens at {path} ({type(exc).__name__})") from None
    if peer_uid(client) != os.getuid():
        client.close()
        raise ChannelError(f"{path}: the worker's socket is held by another user; refusing to send it the round")
    return client


def peer_uid(connection: socket.socket) -> int:
    """The user id of the process at the other end of ``connection``, from the kernel."""
    raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
    return _PEER_CREDENTIALS.unpack(raw)[1]


def send_frame(connection: socket.socket, kind: int, body: bytes) -> None:
    connection.sendall(_HEADER.pack(MAGIC, kind, len(body)) + body)


def receive_frame(connection: socket.socket) -> tuple[int, bytes]:
    """The next frame's (kind, body).

    Raises
    ------
    WorkerLost
        If the connection ends before a whole frame arrived.
    ChannelError
        If the bytes are not a frame of this protocol.
    """
    magic, kind, length = _HEADER.unpack(_receive_exactly(connection, _HEADER.size))
    if magic != MAGIC or kind not in (REQUEST, REPLY, REFUSAL) or length > MAX_FRAME_BYTES:
        raise ChannelError("not a fedgen worker frame")
    return kind, _receive_exactly(connection, length)


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        n = connection.recv_into(view[received:], min(size - received, 1 << 24))
        if n == 0:
            raise WorkerLost("the connection closed in the middle of the exchange")
        received += n
    return bytes(buffer)


def request_round(path: Path, run_id: int, content: RecordDict) -> RecordDict:
    """Send one round to the worker at ``path`` and return its reply content.

    Raises
    ------
    WorkerUnavailable
        If no worker listens (nothing was sent).
    WorkerLost
        If the worker went away before replying (the round is not retried: it may have
        spent privacy budget, which its ledger then holds).
    RoundRefused
        With the worker's error code and reason.
    """
    with connect(path) as connection:
        try:
            send_frame(connection, REQUEST, _RUN_ID.pack(run_id) + encode_content(content))
            kind, body = receive_frame(connection)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise WorkerLost(f"the worker went away during the round ({type(exc).__name__})") from None
    if kind == REPLY:
        return decode_content(body)
    if kind == REFUSAL:
        (code,) = _CODE.unpack_from(body)
        raise RoundRefused(code, body[_CODE.size :].decode("utf-8"))
    raise ChannelError("the worker answered with a request frame")


def read_request(connection: socket.socket) -> tuple[int, RecordDict]:
    """(run id, content) of the round a relay sent."""
    kind, body = receive_frame(connection)
    if kind != REQUEST or len(body) < _RUN_ID.size:
        raise ChannelError("expected a round request")
    (run_id,) = _RUN_ID.unpack_from(body)
    return run_id, decode_content(body[_RUN_ID.size :])


def send_reply(connection: socket.socket, content: RecordDict) -> None:
    send_frame(connection, REPLY, encode_content(content))


def send_refusal(connection: socket.socket, refused: RoundRefused) -> None:
    send_frame(connection, REFUSAL, _CODE.pack(refused.code) + refused.reason.encode("utf-8"))
