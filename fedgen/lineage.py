"""The lineage ledger: an append-only, hash-chained, signed record of what a federation did.

The aggregator appends one record per event that matters (a run started, a round was
committed, an update was rejected, a site refused for its privacy budget, a model was
approved, a run finished or failed). Each record carries the hash of the one before it
and the signature of the aggregator's lineage-signing certificate (`fedgen.pki.issue_lineage`:
its own key, its own extended key usage, never the TLS key and never a site's), so an
auditor holding only the ledger, that certificate and (optionally) the checkpoints can
check that nothing was changed, removed, duplicated or reordered, and which sites
contributed which updates to which model. The sites are witnesses: each round's
instructions carry the ledger head, each site signs the head it saw together with its
update and keeps a receipt of it (`fedgen.receipts`), so that the holder of the signing
key cannot rewrite or truncate the history the sites saw without the receipts showing it.

File format
-----------
A ledger is a file of UTF-8 lines, one record per line. Every line ends in the byte
``0x0A`` (``\\n``), the only line separator: characters such as U+2028 inside strings do
not end a line. A line is the *canonical encoding* of its record, which is exactly::

    json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
               allow_nan=False).encode("utf-8")

that is: object members sorted by key (Unicode code point order, at every depth), no
whitespace between tokens, non-ASCII characters written as themselves in UTF-8 (only
``"``, ``\\`` and control characters are escaped, the latter as ``\\n``, ``\\t`` …
or ``\\u00XX``), floats as Python's shortest round-trip ``repr``, and no NaN or infinity.
A line whose bytes are not the canonical encoding of the JSON they hold is malformed.

Each record is a JSON object with exactly these members (shown in canonical order):

``body``
    object: what happened; its keys depend on ``type`` (see *Bodies* below).
``hash``
    64 lowercase hex characters: SHA-256 of the UTF-8 canonical encoding of the record
    *without* its ``hash`` and ``signature`` members. Because the line is canonical and
    neither member is ever the last one, those bytes are simply the line (without its
    ``\\n``) with the text ``"hash":"<hex>",`` and ``"signature":"<base64>",`` removed,
    taking the *last* occurrence of each (the body comes first and may hold members with
    the same names; no string after it can hold an unescaped quote).
``prev``
    64 lowercase hex characters: the ``hash`` of the previous line's record; 64 zeros
    (``GENESIS_PREV``) for the record with ``seq`` 0.
``run_id``
    non-empty string: the federated run the record belongs to (one ledger may hold
    several runs).
``seq``
    integer: the record's 0-based position in the file (line ``n`` holds ``seq`` n-1).
``signature``
    standard base64 with padding (RFC 4648 section 4) of a DER-encoded ECDSA signature
    (P-256, SHA-256) by the lineage-signing key over the 64 ASCII bytes of ``hash`` (the
    hex text itself is the signed message, as `fedgen.pki.sign_digest` does). The text
    must be the canonical base64 of the bytes it decodes to.
``signer``
    64 lowercase hex characters: SHA-256 of the DER encoding of the lineage-signing
    certificate whose key signed the record (`fedgen.pki.fingerprint`).
``time``
    string: when the record was written, ISO 8601 with a UTC offset of zero, e.g.
    ``2025-05-01T12:00:00.123456+00:00``.
``type``
    one of ``RECORD_TYPES``.

Verification (what `verify` does)
---------------------------------
Lines are read in order and the walk stops at the first record that fails a check,
reporting its line number (1-based) and the seq its position calls for (line - 1):

1. The line is UTF-8 JSON, an object with exactly the members above, each of the right
   kind, and the line is its canonical encoding.
2. ``seq`` equals the position (else a record was deleted, duplicated or moved).
3. ``prev`` equals the previous record's ``hash`` (64 zeros for the first).
4. ``hash`` recomputes.
5. ``signer`` is the fingerprint of a signer certificate given, that certificate is a
   lineage-signing certificate (extended key usage exactly `fedgen.pki.LINEAGE_SIGNING_OID`:
   a TLS server or site certificate is refused), and ``signature`` verifies under its
   public key; with a CA certificate given, the CA issued it and it was valid at
   ``time``; with a CRL given as well, it was not revoked at ``time``.
6. For ``round_committed``: ``body.ledger_head``, when not null, names an earlier record
   of this ledger by its ``seq`` and ``hash``; with a checkpoints folder given, the
   checkpoint named in ``body.model_out.checkpoint`` is there (a missing one is a
   failure) and its model digest (`fedgen.params.model_file_digest`: tensors and header
   metadata) is ``body.model_out.digest``; ``body.model_in.digest`` equals the
   ``model_out.digest`` of the run's previous committed round; each contribution that
   carries both a signature and a certificate has a valid site signature over its
   `witness_statement` (and, with a CA given, a certificate the CA issued, valid and,
   with a CRL, not revoked at ``time``, whose CN is the contribution's ``site``).

Bytes after the last ``\\n`` are what a writer killed in the middle of an append leaves:
a torn tail, which is not an error (the record was never acknowledged) and is reported
as ``incomplete_tail``. A tail that cannot be such a prefix of a record (it does not start
like one, or holds a whole record followed by more bytes) is an error. Removing whole
records from the end of a ledger, or re-chaining and re-signing it with the genuine key,
cannot be seen from the ledger alone: the sites' receipts show it (`fedgen.receipts`).

What sites sign
---------------
Each round's train instructions carry the ledger head when the round was configured (its
``seq``, ``hash`` and ``signature``, and the lineage-signing certificate) and the number
the ledger records the round under (a resumed run numbers its rounds on). A site signs,
with its certificate key (`fedgen.pki.sign_message`), the `witness_statement`: the
canonical encoding of ``{"head_hash": hex or null, "head_seq": int or null, "purpose":
"fedgen lineage witness v1", "round": int, "run_id": str, "update_digest": hex}``, and
keeps a receipt of it. The round record's ``ledger_head`` and ``run_id``, the
contribution's ``update_digest`` and the round rebuild that statement.

Bodies
------
The writer does not enforce bodies; `verify` and `export_prov` read these keys, each
optional unless said otherwise:

``round_committed``
    ``round`` (int), ``ledger_head`` ``{"seq": int, "hash": hex}`` or null (the head the
    round's instructions carried), ``model_in`` ``{"digest": hex}``, ``model_out``
    ``{"digest": hex, "checkpoint": "round-0003-<digest[:16]>.safetensors"}`` (a file
    name in the checkpoints folder, never a path), ``started_at`` (ISO 8601),
    ``contributions``: a list of ``{"site": str, "update_digest": hex, "signature":
    base64 or null, "certificate": PEM or null, "fingerprint": hex, "examples": int,
    "epsilon": float, …}``; ``failed``: a list of ``{"site": str, "reason": str}``. A
    contribution's ``fingerprint``, when given with a certificate, must be that
    certificate's. Anything else (strategy, metrics, rejects, versions) is free-form.
``update_rejected``
    ``round`` (int), ``site`` (str), ``update_digest`` (hex), ``reason`` (str).
``model_approved``
    ``round`` (int), ``by`` (str, the person), ``reason`` (str), ``model_digest`` (hex).

Model digests are `fedgen.params.model_digest`: SHA-256 over the canonical encoding of a
model's tensors (sorted names; for each: name, little-endian dtype, shape, C-order bytes)
and of its checkpoint header metadata (model config, round). Update digests are
`fedgen.params.digest`, over the tensors alone.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedgen import pki

RECORD_TYPES = ("run_started", "round_committed", "update_rejected", "site_refused",
                "model_approved", "run_finished", "run_failed")
RECORD_FIELDS = ("body", "hash", "prev", "run_id", "seq", "signature", "signer", "time", "type")
GENESIS_PREV = "0" * 64
WITNESS_PURPOSE = "fedgen lineage witness v1"
PROV_PREFIXES = {"fedgen": "https://fedgen.invalid/ns#", "sha256": "urn:sha256:"}

StrPath = str | os.PathLike[str]

_HEX64 = re.compile(r"[0-9a-f]{64}")
# Every canonical record line starts like this ("body" sorts first), so a torn tail does too.
_RECORD_START = b'{"body":'


class LineageError(ValueError):
    """A lineage ledger cannot be written or read; the message names the file or line."""


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of `verify`.

    Attributes
    ----------
    ok
        True if every whole record passed every check.
    records
        Whole records that passed, in order (all of them when ``ok``).
    head_hash
        ``hash`` of the last record that passed; None if none did.
    error
        Why the first broken record fails, naming its line and seq; None when ``ok``.
    error_seq
        The seq the broken record's position calls for (line - 1); None when ``ok``.
    error_line
        The broken record's 1-based line number; None when ``ok``.
    incomplete_tail
        True if the file ends in a torn append (bytes after the last newline).
    checkpoints_checked
        Checkpoint files whose digest was recomputed and matched.
    site_signatures_checked
        Site signatures over update digests that verified.
    """

    ok: bool
    records: int
    head_hash: str | None
    error: str | None
    error_seq: int | None
    error_line: int | None
    incomplete_tail: bool
    checkpoints_checked: int
    site_signatures_checked: int


# ---------------------------------------------------------------------------- encoding


def canonical_encoding(value: Any) -> bytes:
    """The canonical JSON encoding, as UTF-8 bytes, that lines are written in and hashes taken over.

    Raises
    ------
    LineageError
        If ``value`` holds something JSON cannot represent (NaN, infinity, objects, lone
        surrogates).
    """
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise LineageError(f"not representable as lineage JSON ({exc}); record NaN or infinity "
                           "as null or a string, and numpy values as plain numbers") from None


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical encoding of ``record`` without ``hash`` and ``signature``."""
    unsigned = {key: value for key, value in record.items() if key not in ("hash", "signature")}
    return hashlib.sha256(canonical_encoding(unsigned)).hexdigest()


def _plain_json(body: Mapping[str, Any]) -> dict[str, Any]:
    # A round trip turns tuples into lists and int keys into strings, so the record hashed
    # here is the record a reader parses back (int keys would otherwise sort differently).
    plain = json.loads(canonical_encoding(body))
    if not isinstance(plain, dict):
        raise LineageError(f"a record body must be a JSON object, not {type(body).__name__}")
    return plain


def _decode_signature(text: str) -> bytes | None:
    """The bytes of canonical standard base64 ``text``; None if it is not exactly that."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    # Spare bits in the last character would let two texts decode to the same bytes.
    return raw if base64.b64encode(raw).decode("ascii") == text else None


def _parse_time(text: Any) -> datetime | None:
    """``text`` as a UTC datetime if it is an ISO 8601 string with a zero offset, else None."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    offset = moment.utcoffset()
    return moment if offset is not None and not offset else None


def _is_hex_digest(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


# ---------------------------------------------------------------------------- witnesses


@dataclass(frozen=True)
class LedgerHead:
    """The last record of a ledger, as a round's instructions show it to the sites.

    Attributes
    ----------
    seq, hash
        The record's ``seq`` and ``hash``.
    signature
        The record's ``signature`` (base64): the lineage signer's commitment to ``hash``,
        which makes a site's receipt of it evidence against the signer.
    """

    seq: int
    hash: str
    signature: str


def witness_statement(run_id: str, server_round: int, head_seq: int | None, head_hash: str | None,
                      update_digest: str) -> bytes:
    """The bytes a site signs for a round: its update and the ledger head it was shown.

    Both sides build it here: the site to sign it, the aggregator's recorder and `verify`
    to check the signature, from the round record (see *What sites sign* above).
    """
    return canonical_encoding({"purpose": WITNESS_PURPOSE, "run_id": run_id, "round": server_round,
                               "head_seq": head_seq, "head_hash": head_hash, "update_digest": update_digest})


# ---------------------------------------------------------------------------- reading


def _split_ledger(data: bytes) -> tuple[list[bytes], bytes]:
    """The whole lines of a ledger (without their newlines) and the bytes after the last one."""
    *lines, tail = data.split(b"\n")
    return lines, tail


def _read_ledger(path: Path) -> tuple[list[bytes], bytes]:
    try:
        return _split_ledger(path.read_bytes())
    except FileNotFoundError:
        raise LineageError(f"{path} not found: no lineage ledger has been written there") from None
    except OSError as exc:
        raise LineageError(f"{path} cannot be read ({exc})") from None


def _field_problems(record: dict[str, Any]) -> list[str]:
    """What is wrong with the members of a parsed record, as phrases; empty if nothing."""
    missing = [name for name in RECORD_FIELDS if name not in record]
    extra = sorted(set(record) - set(RECORD_FIELDS))
    problems = [f"the record lacks {', '.join(missing)}"] if missing else []
    if extra:
        problems.append(f"the record has unknown members {', '.join(extra)}")
    checks = {
        "seq": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "type": lambda v: v in RECORD_TYPES,
        "time": lambda v: _parse_time(v) is not None,
        "run_id": lambda v: isinstance(v, str) and bool(v),
        "body": lambda v: isinstance(v, dict),
        "prev": _is_hex_digest,
        "hash": _is_hex_digest,
        "signer": _is_hex_digest,
        "signature": lambda v: isinstance(v, str),
    }
    problems += [f"invalid {name} {record[name]!r:.80}" for name, valid in checks.items()
                 if name in record and not valid(record[name])]
    return problems


def _decode_line(raw: bytes) -> dict[str, Any]:
    """Parse one whole line into a well-formed record.

    Raises
    ------
    LineageError
        Saying what is malformed (no location: callers add it).
    """
    try:
        record = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError too
        raise LineageError(f"not valid UTF-8 JSON ({exc})") from None
    if not isinstance(record, dict):
        raise LineageError("not a JSON object")
    problems = _field_problems(record)
    if problems:
        raise LineageError("; ".join(problems))
    if canonical_encoding(record) != raw:
        raise LineageError("the line is not in canonical encoding: its bytes were changed or reformatted")
    return record


def _check_chain(record: dict[str, Any], position: int, prev_hash: str) -> None:
    """Check seq, prev and hash of a well-formed record at ``position``."""
    if record["seq"] != position:
        raise LineageError(f"the record holds seq {record['seq']} where seq {position} belongs: "
                           "a record was deleted, duplicated or moved")
    if record["prev"] != prev_hash:
        raise LineageError(f"prev {record['prev'][:16]}… is not the hash of the record before it "
                           f"({prev_hash[:16]}…): the chain is broken")
    if record["hash"] != record_hash(record):
        raise LineageError("the hash does not match the record's contents: the record was changed")


def _tail_problem(tail: bytes) -> str | None:
    """Why the bytes after the last newline cannot be a torn append; None if they can be."""
    if not (tail.startswith(_RECORD_START) or _RECORD_START.startswith(tail)):
        return "the last line has no newline and does not start like a record: bytes were added or changed"
    text = tail.decode("utf-8", errors="replace")
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None  # an unfinished record: what a writer killed mid-append leaves
    if end < len(text):
        return "the last line holds a whole record followed by more bytes: its newline was changed"
    return None


def _location(line: int) -> str:
    return f"line {line} (seq {line - 1})"


def read_records(path: StrPath) -> list[dict[str, Any]]:
    """The well-formed records of a ledger, in file order; a torn tail is left out.

    Hashes, signatures and the chain are not checked here: that is `verify`.

    Raises
    ------
    LineageError
        If the file cannot be read or a whole line is not a well-formed record.
    """
    path = Path(path)
    lines, _ = _read_ledger(path)
    records = []
    for number, raw in enumerate(lines, start=1):
        try:
            records.append(_decode_line(raw))
        except LineageError as exc:
            raise LineageError(f"{path}: {_location(number)}: {exc}") from None
    return records


# ---------------------------------------------------------------------------- writing


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
        raise LineageError(f"{path}: another writer holds its lock ({lock_path}); only one aggregator "
                           "may append to a lineage ledger at a time, so stop the other one first") from None
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
    lines, tail = _read_ledger(path)
    head = None
    for position, raw in enumerate(lines):
        try:
            record = _decode_line(raw)
            _check_chain(record, position, head.hash if head else GENESIS_PREV)
        except LineageError as exc:
            raise LineageError(f"{path}: {_location(position + 1)}: {exc}; appending is refused: run "
                               "`fedgen lineage verify` and restore the ledger from a backup") from None
        head = LedgerHead(record["seq"], record["hash"], record["signature"])
    size = sum(len(raw) + 1 for raw in lines)
    if tail:
        problem = _tail_problem(tail)
        if problem:
            raise LineageError(f"{path}: {_location(len(lines) + 1)}: {problem}; appending is refused: "
                               "run `fedgen lineage verify` and restore the ledger from a backup")
        with open(path, "r+b") as handle:
            handle.truncate(size)
            os.fsync(handle.fileno())
    return head, len(lines), size


class LineageWriter:
    """The only appender of a ledger: holds its lock, signs and durably appends records.

    Open it with `LineageWriter.open`; use it as a context manager or call `close`.
    """

    def __init__(self, path: Path, private_key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate,
                 *, lock_descriptor: int, descriptor: int, head: LedgerHead | None, next_seq: int,
                 size: int) -> None:
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
    def open(cls, path: StrPath, private_key: ec.EllipticCurvePrivateKey,
             certificate: x509.Certificate) -> LineageWriter:
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
            raise LineageError(f"{path}: the signing key is not the key of the lineage-signing certificate "
                               f"{pki.fingerprint(certificate)[:16]}…; pass the matching pair")
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_descriptor = _acquire_lock(path)
        try:
            head, next_seq, size = _recover(path)
            descriptor = _open_for_append(path)
        except BaseException:
            fcntl.flock(lock_descriptor, fcntl.LOCK_UN)
            os.close(lock_descriptor)
            raise
        return cls(path, private_key, certificate, lock_descriptor=lock_descriptor,
                   descriptor=descriptor, head=head, next_seq=next_seq, size=size)

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
            What happened, as JSON-representable data (see the module's *Bodies*).
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
            "seq": self._next_seq, "type": type, "time": now.isoformat(timespec="microseconds"),
            "run_id": run_id, "body": _plain_json(body), "prev": self.head_hash or GENESIS_PREV,
            "signer": self._signer,
        }
        record["hash"] = record_hash(record)
        record["signature"] = base64.b64encode(pki.sign_digest(self._key, record["hash"])).decode("ascii")
        self._write_line(canonical_encoding(record) + b"\n")
        self._head = LedgerHead(record["seq"], record["hash"], record["signature"])
        self._next_seq += 1
        return record

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

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _check_certificate_valid(self, now: datetime) -> None:
        # A record signed outside the certificate's validity fails any audit against the CA.
        cert = self._certificate
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise LineageError(f"{self.path}: the lineage-signing certificate {self._signer[:16]}… is valid "
                               f"only from {cert.not_valid_before_utc.isoformat()} to "
                               f"{cert.not_valid_after_utc.isoformat()}; issue a new one with "
                               "`fedgen certs issue lineage --force`")

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
            raise LineageError(f"{self.path}: the record could not be written ({exc}); the ledger "
                               "still ends with its last whole record") from None
        self._size += len(line)


# ---------------------------------------------------------------------------- verifying


def _checkpoint_digest(path: Path) -> str:
    """`fedgen.params.model_file_digest` of a checkpoint: its tensors and header metadata.

    Raises
    ------
    LineageError
        If the file is not a readable safetensors file.
    """
    # fedgen.params loads torch (seconds): only audits that check checkpoints pay for it.
    from fedgen.params import model_file_digest

    try:
        return model_file_digest(path)
    except ValueError as exc:
        raise LineageError(f"checkpoint {exc}") from None


def _mapping_member(body: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = body.get(key)
    if value is not None and not isinstance(value, Mapping):
        raise LineageError(f"body member {key!r} must be an object")
    return value


def _digest_member(body: Mapping[str, Any], key: str) -> str | None:
    """``body[key]["digest"]`` if present, checked to be a SHA-256 hex digest."""
    member = _mapping_member(body, key)
    if member is None or "digest" not in member:
        return None
    if not _is_hex_digest(member["digest"]):
        raise LineageError(f"{key}.digest {member['digest']!r:.80} is not a SHA-256 hex digest")
    return member["digest"]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _Auditor:
    """What `verify` knows while it walks a ledger: trust anchors, checked counts, the chain so far."""

    def __init__(self, signer_certificates: Sequence[x509.Certificate], checkpoints_dir: Path | None,
                 ca_certificate: x509.Certificate | None, crl: x509.CertificateRevocationList | None) -> None:
        self.signers = {pki.fingerprint(cert): cert for cert in signer_certificates}
        self.checkpoints_dir = checkpoints_dir
        self.ca_certificate = ca_certificate
        self.crl = crl
        self.checkpoints_checked = 0
        self.site_signatures_checked = 0
        self.model_out_of_run: dict[str, str] = {}
        self.hashes: list[str] = []  # of the records that passed, by seq

    def check(self, record: dict[str, Any]) -> None:
        """Check signer, signature, issuer and body of a record whose chain is intact."""
        moment = _parse_time(record["time"])
        certificate = self.signers.get(record["signer"])
        if certificate is None:
            expected = ", ".join(f"{fp[:16]}…" for fp in self.signers)
            raise LineageError(f"the record was signed by {record['signer'][:16]}…, not by the lineage-signing "
                               f"certificate given ({expected}): the record was re-signed by someone else")
        try:
            pki.check_lineage_signer(certificate)
        except pki.PKIError as exc:
            raise LineageError(f"the record's signer is refused: {exc}") from None
        signature = _decode_signature(record["signature"])
        if signature is None or not pki.verify_digest_signature(certificate, record["hash"], signature):
            raise LineageError("the signature is not valid under the lineage-signing certificate")
        self._check_issued(certificate, moment, "the lineage-signing certificate")
        if record["type"] == "round_committed":
            self._check_round(record, moment)
        self.hashes.append(record["hash"])

    def _check_issued(self, certificate: x509.Certificate, moment: datetime | None, what: str) -> None:
        """With a CA given, check that it issued ``certificate``, valid and (with a CRL) unrevoked at ``moment``."""
        if self.ca_certificate is None:
            return
        try:
            pki.verify_issued_by(certificate, self.ca_certificate, at=moment)
        except pki.PKIError as exc:
            raise LineageError(f"{what} does not check out against the CA at the record's time: {exc}") from None
        revoked_at = pki.revocation_time(certificate, self.crl) if self.crl is not None else None
        if revoked_at is not None and (moment is None or moment >= revoked_at):
            raise LineageError(f"{what} (serial {certificate.serial_number:x}) was revoked on "
                               f"{revoked_at.isoformat()}, before this record was signed")

    def _check_round(self, record: dict[str, Any], moment: datetime | None) -> None:
        body, run_id = record["body"], record["run_id"]
        head = self._ledger_head(body)
        model_in, model_out = _digest_member(body, "model_in"), _digest_member(body, "model_out")
        previous = self.model_out_of_run.get(run_id)
        if model_in is not None and previous is not None and model_in != previous:
            raise LineageError(f"model_in {model_in[:16]}… is not the model_out {previous[:16]}… of run "
                               f"{run_id!r}'s previous committed round: a round is missing or the "
                               "global model was swapped between rounds")
        if model_out is not None:
            self.model_out_of_run[run_id] = model_out
            self._check_checkpoint(body["model_out"], model_out)
        contributions = body.get("contributions", [])
        if not isinstance(contributions, list):
            raise LineageError("body member 'contributions' must be a list")
        for contribution in contributions:
            self._check_contribution(contribution, moment, run_id, body.get("round"), head)

    def _ledger_head(self, body: Mapping[str, Any]) -> tuple[int | None, str | None]:
        """The round's ``ledger_head`` as (seq, hash), checked to be an earlier record of this ledger."""
        head = _mapping_member(body, "ledger_head")
        if head is None:
            return None, None
        seq, head_hash = head.get("seq"), head.get("hash")
        if not _is_count(seq) or not _is_hex_digest(head_hash):
            raise LineageError(f"ledger_head {dict(head)!r:.120} is not a seq and a hash")
        if seq >= len(self.hashes) or self.hashes[seq] != head_hash:
            raise LineageError(f"ledger_head names seq {seq} with hash {head_hash[:16]}…, which is not a record "
                               "before this one in this ledger")
        return seq, head_hash

    def _check_checkpoint(self, model_out: Mapping[str, Any], model_digest: str) -> None:
        name = model_out.get("checkpoint")
        if self.checkpoints_dir is None or name is None:
            return
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise LineageError(f"model_out.checkpoint {name!r:.80} is not a plain file name")
        path = self.checkpoints_dir / name
        if not path.is_file():
            raise LineageError(f"checkpoint {name} that this record commits is missing from {self.checkpoints_dir}")
        actual = _checkpoint_digest(path)
        if actual != model_digest:
            raise LineageError(f"checkpoint {path} holds a model with digest {actual[:16]}…, not the "
                               f"model_out {model_digest[:16]}… this record commits: the file was "
                               "altered or swapped")
        self.checkpoints_checked += 1

    def _check_contribution(self, contribution: Any, moment: datetime | None, run_id: str, server_round: Any,
                            head: tuple[int | None, str | None]) -> None:
        if not isinstance(contribution, Mapping) or not isinstance(contribution.get("site"), str):
            raise LineageError("every contribution must be an object with a string 'site'")
        site = contribution["site"]
        pem, signature_text = contribution.get("certificate"), contribution.get("signature")
        if pem is None or signature_text is None:
            return  # nothing to check it against
        where = f"contribution of site {site!r}"
        digest = contribution.get("update_digest")
        if not _is_hex_digest(digest):
            raise LineageError(f"{where} has no valid update_digest ({digest!r:.80})")
        if not _is_count(server_round):
            raise LineageError(f"a round with signed contributions needs an integer 'round', not {server_round!r:.40}")
        try:
            certificate = x509.load_pem_x509_certificate(str(pem).encode("utf-8"))
        except ValueError as exc:
            raise LineageError(f"{where} carries a certificate that is not PEM ({exc})") from None
        recorded = contribution.get("fingerprint")
        if recorded is not None and recorded != pki.fingerprint(certificate):
            raise LineageError(f"{where} names certificate {str(recorded)[:16]}… but carries "
                               f"{pki.fingerprint(certificate)[:16]}…")
        statement = witness_statement(run_id, server_round, *head, digest)
        signature = _decode_signature(signature_text) if isinstance(signature_text, str) else None
        if signature is None or not pki.verify_message_signature(certificate, statement, signature):
            raise LineageError(f"{where}: the site signature over update {digest[:16]}… and ledger head "
                               f"{head[1][:16] + '…' if head[1] else 'none'} is not valid under the "
                               "certificate recorded with it")
        if self.ca_certificate is not None:
            self._check_issued(certificate, moment, f"the certificate of site {site!r}")
            self._check_site_name(certificate, site, where)
        self.site_signatures_checked += 1

    @staticmethod
    def _check_site_name(certificate: x509.Certificate, site: str, where: str) -> None:
        try:
            named = pki.site_id_of(certificate)
        except pki.PKIError as exc:
            raise LineageError(f"{where}: {exc}") from None
        if named != site:
            raise LineageError(f"{where} is signed with the certificate of site {named!r}")

    def report(self, *, records: int, head: str | None, incomplete_tail: bool,
               error: str | None = None, error_line: int | None = None) -> VerifyReport:
        return VerifyReport(
            ok=error is None, records=records, head_hash=head, error=error,
            error_seq=None if error_line is None else error_line - 1, error_line=error_line,
            incomplete_tail=incomplete_tail, checkpoints_checked=self.checkpoints_checked,
            site_signatures_checked=self.site_signatures_checked,
        )


def verify(path: StrPath, signer_certificate: x509.Certificate | Sequence[x509.Certificate], *,
           checkpoints_dir: StrPath | None = None, ca_certificate: x509.Certificate | None = None,
           crl: x509.CertificateRevocationList | None = None) -> VerifyReport:
    """Walk a ledger's chain and stop at the first broken record (see the module docstring).

    Parameters
    ----------
    path
        The ledger file.
    signer_certificate
        The lineage-signing certificate whose key signed the records; several if it was
        renewed during the ledger's life. Any other kind of certificate is refused.
    checkpoints_dir
        Where the round checkpoints are: every one a record names must be there, and its
        model digest is recomputed.
    ca_certificate
        The consortium CA: the signer's and the sites' certificates must be issued by it
        and valid at each record's time, and each site certificate's CN must be its site.
    crl
        The consortium CRL (needs ``ca_certificate``, which must have signed it): a record
        signed, or a contribution signed, by a certificate revoked at or before the
        record's time fails.

    Returns
    -------
    VerifyReport
        ``ok`` and counts, or the first broken record with why it fails. A torn tail is no
        failure: ``incomplete_tail`` says it is there.

    Raises
    ------
    LineageError
        If the ledger file cannot be read, or a CRL is given that the CA did not sign or
        that is past its next update.
    """
    certificates = ([signer_certificate] if isinstance(signer_certificate, x509.Certificate)
                    else list(signer_certificate))
    if crl is not None:
        if ca_certificate is None:
            raise LineageError("a CRL can only be checked against the CA that signed it: give the CA as well")
        try:
            pki.check_crl(crl, ca_certificate)
        except pki.PKIError as exc:
            raise LineageError(f"the CRL cannot be used: {exc}") from None
    auditor = _Auditor(certificates, None if checkpoints_dir is None else Path(checkpoints_dir),
                       ca_certificate, crl)
    lines, tail = _read_ledger(Path(path))
    head = None
    for position, raw in enumerate(lines):
        try:
            record = _decode_line(raw)
            _check_chain(record, position, head or GENESIS_PREV)
            auditor.check(record)
        except LineageError as exc:
            line = position + 1
            return auditor.report(records=position, head=head, incomplete_tail=False,
                                  error=f"{_location(line)}: {exc}", error_line=line)
        head = record["hash"]
    problem = _tail_problem(tail) if tail else None
    if problem:
        line = len(lines) + 1
        return auditor.report(records=len(lines), head=head, incomplete_tail=False,
                              error=f"{_location(line)}: {problem}", error_line=line)
    return auditor.report(records=len(lines), head=head, incomplete_tail=bool(tail))


# ---------------------------------------------------------------------------- PROV export


def _local(text: Any) -> str:
    """``text`` made safe as the local part of a PROV qualified name (percent-encoded)."""
    return quote(str(text), safe="").replace("~", "%7E")


def _qualified(name: str) -> dict[str, str]:
    return {"$": name, "type": "prov:QUALIFIED_NAME"}


class _ProvDocument:
    """A PROV-JSON document under construction, with unique relation ids."""

    _RELATION_PREFIXES = {"wasGeneratedBy": "wgb", "used": "u", "wasAssociatedWith": "waw",
                          "wasAttributedTo": "wat", "wasDerivedFrom": "wdf"}

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, dict[str, Any]]] = {"entity": {}, "activity": {}, "agent": {}}
        self.relations: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in self._RELATION_PREFIXES}
        self.generated: set[str] = set()

    def node(self, kind: str, identifier: str, attributes: dict[str, Any]) -> str:
        """Add a node unless it exists (it keeps the attributes it was first given; None ones are left out)."""
        self.nodes[kind].setdefault(identifier, {name: value for name, value in attributes.items()
                                                 if value is not None})
        return identifier

    def relate(self, kind: str, **members: Any) -> None:
        table = self.relations[kind]
        identifier = f"_:{self._RELATION_PREFIXES[kind]}{len(table) + 1}"
        table[identifier] = {f"prov:{name}": value for name, value in members.items() if value is not None}

    def generated_by(self, entity: str, activity: str, time: str | None = None) -> None:
        """Record the entity's generation; an entity is generated once, by its first activity."""
        if entity not in self.generated:
            self.generated.add(entity)
            self.relate("wasGeneratedBy", entity=entity, activity=activity, time=time)

    def model(self, digest: str, run_id: str, round_number: Any) -> str:
        return self.node("entity", f"sha256:{digest}", {
            "prov:type": _qualified("fedgen:Model"), "fedgen:run": run_id, "fedgen:round": round_number})

    def aggregator(self, signer: str) -> str:
        return self.node("agent", f"fedgen:aggregator-{signer[:16]}", {
            "prov:type": _qualified("prov:SoftwareAgent"), "fedgen:certificateFingerprint": signer})

    def site(self, site: str) -> str:
        return self.node("agent", f"fedgen:site-{_local(site)}", {
            "prov:type": _qualified("prov:Organization"), "fedgen:site": site})

    def document(self) -> dict[str, Any]:
        return {"prefix": dict(PROV_PREFIXES), **self.nodes, **self.relations}


def _add_round(document: _ProvDocument, record: dict[str, Any]) -> None:
    body, run_id = record["body"], record["run_id"]
    number = body.get("round", f"seq{record['seq']}")
    round_name = f"run-{_local(run_id)}-round-{_local(number)}"
    model_in, model_out = _digest_member(body, "model_in"), _digest_member(body, "model_out")
    attributes = {"prov:type": _qualified("fedgen:AggregationRound"), "fedgen:run": run_id,
                  "fedgen:round": number, "prov:endTime": record["time"]}
    if isinstance(body.get("started_at"), str):
        attributes["prov:startTime"] = body["started_at"]
    round_id = document.node("activity", f"fedgen:{round_name}", attributes)
    document.relate("wasAssociatedWith", activity=round_id, agent=document.aggregator(record["signer"]))
    input_id = None
    if model_in is not None:
        input_id = document.model(model_in, run_id, number - 1 if isinstance(number, int) else None)
        document.relate("used", activity=round_id, entity=input_id)
    if model_out is not None:
        output_id = document.model(model_out, run_id, number)
        checkpoint = body["model_out"].get("checkpoint")
        if checkpoint is not None:
            document.nodes["entity"][output_id].setdefault("fedgen:checkpoint", checkpoint)
        document.generated_by(output_id, round_id, record["time"])
        if input_id is not None:
            document.relate("wasDerivedFrom", generatedEntity=output_id, usedEntity=input_id)
    contributions = body.get("contributions")
    for contribution in contributions if isinstance(contributions, list) else []:
        _add_contribution(document, contribution, round_name, round_id, input_id)


def _add_contribution(document: _ProvDocument, contribution: Any, round_name: str,
                      round_id: str, input_id: str | None) -> None:
    if not isinstance(contribution, Mapping):
        return
    site, update_digest = contribution.get("site"), contribution.get("update_digest")
    if not isinstance(site, str) or not _is_hex_digest(update_digest):
        return
    site_id = document.site(site)
    training_id = document.node("activity", f"fedgen:{round_name}-site-{_local(site)}", {
        "prov:type": _qualified("fedgen:LocalTraining"), "fedgen:site": site})
    document.relate("wasAssociatedWith", activity=training_id, agent=site_id)
    if input_id is not None:
        document.relate("used", activity=training_id, entity=input_id)
    attributes: dict[str, Any] = {"prov:type": _qualified("fedgen:ModelUpdate"), "fedgen:site": site}
    attributes.update({f"fedgen:{key}": contribution[key] for key in ("examples", "epsilon", "delta")
                       if key in contribution})
    update_id = document.node("entity", f"sha256:{update_digest}", attributes)
    document.generated_by(update_id, training_id)
    document.relate("wasAttributedTo", entity=update_id, agent=site_id)
    document.relate("used", activity=round_id, entity=update_id)


def _add_approval(document: _ProvDocument, record: dict[str, Any]) -> None:
    body = record["body"]
    person = str(body.get("by", "unknown"))
    person_id = document.node("agent", f"fedgen:person-{_local(person)}", {
        "prov:type": _qualified("prov:Person"), "fedgen:name": person})
    attributes = {"prov:type": _qualified("fedgen:ModelApproval"), "fedgen:run": record["run_id"],
                  "prov:endTime": record["time"]}
    attributes.update({f"fedgen:{key}": body[key] for key in ("round", "reason") if key in body})
    approval_id = document.node("activity", f"fedgen:run-{_local(record['run_id'])}-approval-{record['seq']}",
                                attributes)
    document.relate("wasAssociatedWith", activity=approval_id, agent=person_id)
    if _is_hex_digest(body.get("model_digest")):
        model_id = document.model(body["model_digest"], record["run_id"], body.get("round"))
        document.relate("used", activity=approval_id, entity=model_id)


def export_prov(path: StrPath) -> dict[str, Any]:
    """The ledger's provenance as a W3C PROV-JSON document.

    Global model versions and site updates become entities (``sha256:<digest>``); rounds,
    sites' local training and model approvals become activities; the aggregator, the
    sites and approving people become agents; generation, usage, association, attribution
    and derivation relate them. Records are read, not verified: run `verify` first.

    Returns
    -------
    dict
        ``prefix``, ``entity``, ``activity``, ``agent`` and the relation tables
        ``wasGeneratedBy``, ``used``, ``wasAssociatedWith``, ``wasAttributedTo``,
        ``wasDerivedFrom``, each keyed by ``_:<kind><n>``.

    Raises
    ------
    LineageError
        If the ledger cannot be read, a whole line is malformed, or a round's model
        digests are.
    """
    document = _ProvDocument()
    for position, record in enumerate(read_records(path)):
        try:
            if record["type"] == "round_committed":
                _add_round(document, record)
            elif record["type"] == "model_approved":
                _add_approval(document, record)
        except LineageError as exc:
            raise LineageError(f"{path}: {_location(position + 1)}: {exc}") from None
    return document.document()
