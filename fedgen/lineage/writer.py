"""The ledger's only appender: one writer at a time, each record signed and durably appended.

A writer holds ``<ledger>.lock`` while it is open. On opening, it checks the chain of the
records already there and cuts off a torn tail that a writer killed mid-append left; each
append is one ``write`` followed by ``fsync``, and a failed or short write is cut back
off, so the ledger always ends with its last whole record.
"""

from __future__ import annotations

import base64
import fcntl
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedgen import pki

from .format import (
    GENESIS_PREV,
    RECORD_TYPES,
    LedgerHead,
    LineageError,
    StrPath,
    canonical_encoding,
    check_chain,
    decode_line,
    location,
    plain_json,
    read_ledger,
    record_hash,
    tail_problem,
)
from .records import BodyT, Record


def _acquire_lock(path: Path) -> int:
    """Take the ledger's exclusive writer lock; return the lock file's descriptor."""
    lock_path = path.with_suffix(path.suffix + ".lock")
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # flock belongs to the open file description, so a second open in this same
        # process is refused as well as one in another process.
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise LineageError(
            f"{path}: another writer holds its lock ({lock_path}); only one aggregator "
            "may append to a lineage ledger at a time, so stop the other one first"
        ) from None
    return descriptor


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _open_for_append(path: Path) -> int:
    """An ``O_APPEND`` descriptor on the ledger, creating it (durably) if it is missing."""
    created = not path.exists()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if created:  # make the new file's name durable, not only its contents
        try:
            _fsync_directory(path.parent)
        except OSError:
            os.close(descriptor)
            raise
    return descriptor


def _recover(path: Path) -> tuple[LedgerHead | None, int, int]:
    """Check an existing ledger and cut off a torn tail.

    Returns
    -------
    tuple
        The head (None if empty), the number of records, the file size after recovery.

    Raises
    ------
    LineageError
        If a whole record is malformed or the chain is broken, naming the line.
    """
    if not path.exists():
        return None, 0, 0
    lines, tail = read_ledger(path)
    head = None
    for position, raw in enumerate(lines):
        try:
            record = decode_line(raw)
            check_chain(record, position, head.hash if head else GENESIS_PREV)
        except LineageError as exc:
            raise LineageError(
                f"{path}: {location(position + 1)}: {exc}; appending is refused: run "
                "`fedgen lineage verify` and restore the ledger from a backup"
            ) from None
        head = LedgerHead(record["seq"], record["hash"], record["signature"])
    size = sum(len(raw) + 1 for raw in lines)
    if tail:
        problem = tail_problem(tail)
        if problem:
            raise LineageError(
                f"{path}: {location(len(lines) + 1)}: {problem}; appending is refused: "
                "run `fedgen lineage verify` and restore the ledger from a backup"
            )
        with open(path, "r+b") as handle:
            handle.truncate(size)
            os.fsync(handle.fileno())
    return head, len(lines), size


class LineageWriter:
    """The only appender of a ledger: holds its lock, signs and durably appends records.

    Open it with `LineageWriter.open`; use it as a context manager or call `close`.
    """

    def __init__(
        self,
        path: Path,
        private_key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        *,
        lock_descriptor: int,
        descriptor: int,
        head: LedgerHead | None,
        next_seq: int,
        size: int,
    ) -> None:
        self.path = path
        self._key = private_key
        self._certificate = certificate
        self._signer = pki.fingerprint(certificate)
        self._lock_descriptor: int | None = lock_descriptor
        self._descriptor = descriptor
        self._head = head
        self._next_seq = next_seq
        self._size = size

    @classmethod
    def open(
        cls, path: StrPath, private_key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate
    ) -> LineageWriter:
        """Lock the ledger at ``path`` (creating it if need be) and get ready to append.

        A torn tail left by a writer killed mid-append is cut off (and the cut fsynced);
        the chain then continues from the last whole record.

        Parameters
        ----------
        path
            The ledger file; its lock is ``<path>.lock`` beside it.
        private_key
            The lineage-signing key, which signs every record.
        certificate
            The lineage-signing certificate (`fedgen.pki.issue_lineage`); its fingerprint
            becomes each record's ``signer``.

        Raises
        ------
        LineageError
            If the certificate is not a lineage-signing certificate (a TLS or site
            certificate is refused), the key is not the certificate's, another writer
            holds the lock, or a whole record of the existing ledger is malformed or out
            of chain (naming the line).
        """
        path = Path(path)
        try:
            pki.check_lineage_signer(certificate)
        except pki.PKIError as exc:
            raise LineageError(f"{path}: refusing to sign the ledger: {exc}") from None
        if not pki.certificate_matches_key(certificate, private_key):
            raise LineageError(
                f"{path}: the signing key is not the key of the lineage-signing certificate "
                f"{pki.fingerprint(certificate)[:16]}…; pass the matching pair"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_descriptor = _acquire_lock(path)
        try:
            head, next_seq, size = _recover(path)
            descriptor = _open_for_append(path)
        except BaseException:
            fcntl.flock(lock_descriptor, fcntl.LOCK_UN)
            os.close(lock_descriptor)
            raise
        return cls(
            path,
            private_key,
            certificate,
            lock_descriptor=lock_descriptor,
            descriptor=descriptor,
            head=head,
            next_seq=next_seq,
            size=size,
        )

    @property
    def head_hash(self) -> str | None:
        """``hash`` of the last record in the ledger; None while it is empty."""
        return self._head.hash if self._head else None

    @property
    def head(self) -> LedgerHead | None:
        """The last record in the ledger (seq, hash, signature); None while it is empty."""
        return self._head

    @property
    def certificate_pem(self) -> str:
        """The lineage-signing certificate, PEM: what sites check the head's signature with."""
        return self._certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def append(self, type: str, body: Mapping[str, Any], run_id: str) -> dict[str, Any]:  # noqa: A002
        """Sign a new record and append it durably (one ``write``, then ``fsync``).

        Parameters
        ----------
        type
            One of ``RECORD_TYPES``.
        body
            What happened, as JSON-representable data (see the format's *Bodies*).
        run_id
            The run the record belongs to.

        Returns
        -------
        dict
            The record as written, ``hash`` and ``signature`` included.

        Raises
        ------
        LineageError
            If the writer is closed, the type or run id is invalid, the body is not
            JSON-representable, the certificate is not valid now, or the write fails (the
            file is then cut back to its last whole record).
        """
        if self._lock_descriptor is None:
            raise LineageError(f"{self.path}: this lineage writer is closed; open a new one")
        if type not in RECORD_TYPES:
            raise LineageError(f"unknown lineage record type {type!r}; use one of {', '.join(RECORD_TYPES)}")
        if not isinstance(run_id, str) or not run_id:
            raise LineageError(f"run id {run_id!r} must be a non-empty string")
        now = datetime.now(timezone.utc)
        self._check_certificate_valid(now)
        record: dict[str, Any] = {
            "seq": self._next_seq,
            "type": type,
            "time": now.isoformat(timespec="microseconds"),
            "run_id": run_id,
            "body": plain_json(body),
            "prev": self.head_hash or GENESIS_PREV,
            "signer": self._signer,
        }
        record["hash"] = record_hash(record)
        record["signature"] = base64.b64encode(pki.sign_digest(self._key, record["hash"])).decode("ascii")
        self._write_line(canonical_encoding(record) + b"\n")
        self._head = LedgerHead(record["seq"], record["hash"], record["signature"])
        self._next_seq += 1
        return record

    def append_body(self, body: BodyT, run_id: str) -> Record[BodyT]:
        """`append` one of the bodies fedgen writes (`fedgen.lineage.records`); return the record, typed.

        Raises
        ------
        LineageError
            As `append`.
        """
        return Record.of(self.append(body.TYPE, body.dump(), run_id), body)

    def close(self) -> None:
        """Close the ledger and release its lock; closing twice is harmless."""
        if self._lock_descriptor is None:
            return
        os.close(self._descriptor)
        fcntl.flock(self._lock_descriptor, fcntl.LOCK_UN)
        os.close(self._lock_descriptor)
        self._lock_descriptor = None

    def __enter__(self) -> LineageWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _check_certificate_valid(self, now: datetime) -> None:
        # A record signed outside the certificate's validity fails any audit against the CA.
        cert = self._certificate
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise LineageError(
                f"{self.path}: the lineage-signing certificate {self._signer[:16]}… is valid "
                f"only from {cert.not_valid_before_utc.isoformat()} to "
                f"{cert.not_valid_after_utc.isoformat()}; issue a new one with "
                "`fedgen certs issue lineage --force`"
            )

    def _write_line(self, line: bytes) -> None:
        """Append ``line`` whole or not at all: a failed or short write is cut back off."""
        try:
            written = os.write(self._descriptor, line)
            if written != len(line):
                raise OSError(f"short write: {written} of {len(line)} bytes")
            os.fsync(self._descriptor)
        except OSError as exc:
            try:
                os.ftruncate(self._descriptor, self._size)
            except OSError:
                pass  # the torn tail is then cut off by the next `open`
            raise LineageError(
                f"{self.path}: the record could not be written ({exc}); the ledger "
                "still ends with its last whole record"
            ) from None
        self._size += len(line)
