"""Sites as witnesses of the lineage ledger: the receipts they keep, and the auditor's check of them.

A hash chain signed by one key cannot show its key holder rewriting or truncating it:
re-chained and re-signed, any history verifies. So the sites witness it. Each round's
instructions carry the ledger head (seq, hash, and the lineage signer's signature over
the hash) and the round's number in the ledger (`fedgen.protocol.LedgerNotice`); a site
checks that signature, signs its update digest together with that head
(`fedgen.lineage.format.witness_statement`) and, before its reply leaves, appends a receipt to
``<state_dir>/lineage-receipts.jsonl``. The receipt holds the signer's own signature over
the head, so a receipt whose head the ledger no longer holds proves that the holder of the
lineage key rewrote or dropped a record it once signed.

Receipt files
-------------
One JSON object per line, each line ending in ``\\n``, written in the canonical encoding
of `fedgen.lineage.format.canonical_encoding`, with exactly the members ``head_hash`` (hex),
``head_seq`` (int), ``head_signature`` (base64), ``round`` (int: the number the ledger
records the round under), ``run_id`` (str, the Flower run), ``signature`` (the site's
base64 signature over the witness statement, or null for a site without a certificate, as
in simulations), ``site`` (str), ``time`` (ISO 8601 UTC) and ``update_digest`` (hex).
Appends are fsynced; a line torn by a crash is cut off by the next append and ignored by
readers.

What `check_receipts` concludes, per receipt
--------------------------------------------
``witnessed``
    The ledger holds the head at its seq, and the run's later records account for the
    update (a contribution of the round, or an ``update_rejected`` record).
``truncated``
    The ledger ends before the head's seq: records were removed from its end.
``rewritten``
    The record at the head's seq is another one, or the round record lists another
    update for the site, or none (while not listing the site as failed).
``dropped``
    No record of the round follows the head, and the run neither failed nor was resumed:
    the ledger was cut after the site's update (or the aggregator died before committing
    the round, or the run is still going).
``unacknowledged`` (note)
    The round record lists the site as failed (e.g. its reply came after the timeout).
``uncommitted`` (note)
    The run failed, or was resumed by another run, before committing the round.
``unattested`` (note)
    The receipt's head is not signed by a lineage-signing certificate given: it belongs
    to another ledger, or was forged. It proves nothing about this ledger.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509

from fedgen import pki
from fedgen.errors import FedgenError
from fedgen.state_files import RECEIPTS_FILE

from .format import LedgerHead, StrPath, canonical_encoding, is_count, is_hex_digest

FAILURES = ("truncated", "rewritten", "dropped")
NOTES = ("unacknowledged", "uncommitted", "unattested")
STATUSES = ("witnessed", *FAILURES, *NOTES)


class ReceiptError(FedgenError, ValueError):
    """A receipt file cannot be read or written; the message names the file and line."""


class WitnessError(ValueError):
    """A site will not witness a round: the ledger head it was sent is missing or not genuine."""


@dataclass(frozen=True)
class Receipt:
    """What a site keeps of one round it trained: the ledger head it saw and what it sent."""

    site: str
    run_id: str
    round: int
    head_seq: int
    head_hash: str
    head_signature: str
    update_digest: str
    signature: str | None
    time: str

    def to_line(self) -> bytes:
        """The receipt as one line of a receipts file, newline included."""
        return canonical_encoding(asdict(self)) + b"\n"

    @classmethod
    def from_json(cls, value: Any) -> Receipt:
        """Parse a receipt object read from a file.

        Raises
        ------
        ReceiptError
            Saying which member is missing, unknown or of the wrong kind (no location).
        """
        if not isinstance(value, dict):
            raise ReceiptError("not a JSON object")
        names = [field.name for field in fields(cls)]
        missing, extra = [n for n in names if n not in value], sorted(set(value) - set(names))
        if missing or extra:
            raise ReceiptError(f"members missing: {missing or 'none'}; unknown: {extra or 'none'}")
        checks = {
            "site": lambda v: isinstance(v, str) and bool(v),
            "run_id": lambda v: isinstance(v, str) and bool(v),
            "round": is_count,
            "head_seq": is_count,
            "head_hash": is_hex_digest,
            "update_digest": is_hex_digest,
            "head_signature": lambda v: isinstance(v, str),
            "signature": lambda v: v is None or isinstance(v, str),
            "time": lambda v: isinstance(v, str),
        }
        wrong = [f"{name} {value[name]!r:.60}" for name, valid in checks.items() if not valid(value[name])]
        if wrong:
            raise ReceiptError(f"invalid {', '.join(wrong)}")
        return cls(**value)


@dataclass(frozen=True)
class LocatedReceipt:
    """A receipt and where it was read: ``file:line``."""

    source: str
    receipt: Receipt


@dataclass(frozen=True)
class ReceiptFinding:
    """What the ledger says about one receipt (see the module docstring for the statuses)."""

    source: str
    receipt: Receipt
    status: str
    detail: str

    @property
    def failed(self) -> bool:
        return self.status in FAILURES


@dataclass(frozen=True)
class ReceiptReport:
    """The outcome of `check_receipts`: one finding per receipt, in the order given."""

    findings: list[ReceiptFinding]

    @property
    def ok(self) -> bool:
        """True if no receipt shows a rewritten, truncated or dropped record."""
        return not any(finding.failed for finding in self.findings)

    def count(self, status: str) -> int:
        return sum(finding.status == status for finding in self.findings)


def _decode_base64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


# ---------------------------------------------------------------------------- the site's side


def check_ledger_head(head: LedgerHead | None, signer_pem: str | None, ca_certificate: x509.Certificate) -> None:
    """Check, before a site trains, that the head it was sent is signed by the consortium's lineage signer.

    Raises
    ------
    WitnessError
        If there is no head, or its signer is not a lineage-signing certificate the CA
        issued and valid now, or the signature over the head does not verify. The message
        names no path: it goes back to the aggregator.
    """
    if head is None or signer_pem is None:
        raise WitnessError(
            "the aggregator sent no lineage ledger head: the site does not contribute to a round it cannot witness"
        )
    try:
        signer = x509.load_pem_x509_certificate(signer_pem.encode("ascii"))
        pki.verify_issued_by(signer, ca_certificate)
        pki.check_lineage_signer(signer)
    except (ValueError, pki.PKIError) as exc:  # PKIError is a ValueError too
        raise WitnessError(f"the ledger head's signer is not the consortium's lineage signer: {exc}") from None
    signature = _decode_base64(head.signature)
    if signature is None or not pki.verify_digest_signature(signer, head.hash, signature):
        raise WitnessError(
            f"the ledger head (seq {head.seq}, hash {head.hash[:16]}…) is not signed by the "
            "lineage-signing certificate sent with it"
        )


def new_receipt(
    site: str, run_id: str, server_round: int, head: LedgerHead, update_digest: str, signature: bytes | None
) -> Receipt:
    """The receipt of a round a site trained, timestamped now."""
    return Receipt(
        site=site,
        run_id=run_id,
        round=server_round,
        head_seq=head.seq,
        head_hash=head.hash,
        head_signature=head.signature,
        update_digest=update_digest,
        signature=base64.b64encode(signature).decode("ascii") if signature is not None else None,
        time=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
    )


def append_receipt(state_dir: StrPath, receipt: Receipt) -> Path:
    """Append ``receipt`` durably to the site's receipts file; return the file.

    The file is locked while appending; a line torn by an earlier crash is cut off first,
    and a failed write is cut back off, so the file always ends with a whole receipt.

    Raises
    ------
    ReceiptError
        If the file cannot be written (naming it).
    """
    path = Path(state_dir) / RECEIPTS_FILE
    line = receipt.to_line()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # released by close
            size = _whole_lines_size(path)
            if size != os.fstat(descriptor).st_size:
                os.ftruncate(descriptor, size)
            try:
                written = os.write(descriptor, line)
                if written != len(line):
                    raise OSError(f"short write: {written} of {len(line)} bytes")
                os.fsync(descriptor)
            except OSError:
                os.ftruncate(descriptor, size)
                raise
        finally:
            os.close(descriptor)
        if created:
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
    except OSError as exc:
        raise ReceiptError(f"{path}: the lineage receipt could not be written ({exc})") from None
    return path


def _whole_lines_size(path: Path) -> int:
    data = path.read_bytes()
    return data.rfind(b"\n") + 1


# ---------------------------------------------------------------------------- the auditor's side


def read_receipts(path: StrPath) -> list[LocatedReceipt]:
    """The receipts of one receipts file, in order; a torn last line is left out.

    Raises
    ------
    ReceiptError
        If the file cannot be read or a whole line is not a receipt (naming file and line).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReceiptError(f"{path} cannot be read ({exc})") from None
    receipts = []
    for number, raw in enumerate(data.split(b"\n")[:-1], start=1):
        try:
            value = json.loads(raw.decode("utf-8"))
            receipts.append(LocatedReceipt(f"{path}:{number}", Receipt.from_json(value)))
        except (ValueError, RecursionError) as exc:  # ReceiptError and JSON/UTF-8 errors
            raise ReceiptError(f"{path}: line {number}: not a lineage receipt ({exc})") from None
    return receipts


def collect_receipts(locations: Sequence[StrPath]) -> list[LocatedReceipt]:
    """Every receipt in ``locations``: receipts files, or folders holding them.

    A folder is a site's state folder (its ``lineage-receipts.jsonl``) or a folder of
    receipts files collected from sites, each named ``*lineage-receipts.jsonl``
    (e.g. ``hospital-a.lineage-receipts.jsonl``).

    Raises
    ------
    ReceiptError
        If a location does not exist, a folder holds no receipts file, or a file is not
        a receipts file.
    """
    receipts: list[LocatedReceipt] = []
    for location in map(Path, locations):
        if location.is_dir():
            files = sorted(p for p in location.iterdir() if p.name.endswith(RECEIPTS_FILE) and p.is_file())
            if not files:
                raise ReceiptError(
                    f"{location} holds no receipts file ({RECEIPTS_FILE} in a site's state "
                    f"folder, or *{RECEIPTS_FILE} collected from sites)"
                )
        elif location.is_file():
            files = [location]
        else:
            raise ReceiptError(f"{location} not found: give a site's state folder or a receipts file")
        for path in files:
            receipts += read_receipts(path)
    return receipts


def _attested(receipt: Receipt, signers: Sequence[x509.Certificate]) -> bool:
    signature = _decode_base64(receipt.head_signature)
    return signature is not None and any(
        pki.verify_digest_signature(cert, receipt.head_hash, signature) for cert in signers
    )


def _describe(record: Mapping[str, Any]) -> str:
    number = record["body"].get("round")
    return f"{record['type']} of run {record['run_id']}" + (f" round {number}" if number is not None else "")


class _Ledger:
    """The verified records, indexed for the questions receipts ask."""

    def __init__(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.records = list(records)

    def after(self, seq: int, run_id: str) -> list[Mapping[str, Any]]:
        return [r for r in self.records[seq + 1 :] if r["run_id"] == run_id]

    def resumed_by(self, seq: int, run_id: str) -> Mapping[str, Any] | None:
        for record in self.records[seq + 1 :]:
            resumes = record["body"].get("resumes") if record["type"] == "run_started" else None
            if isinstance(resumes, Mapping) and resumes.get("run_id") == run_id:
                return record
        return None


def _finding(ledger: _Ledger, receipt: Receipt, signers: Sequence[x509.Certificate]) -> tuple[str, str]:
    """(status, detail) of one receipt against the ledger."""
    who = f"site {receipt.site!r} (run {receipt.run_id}, round {receipt.round})"
    shown = f"seq {receipt.head_seq} (hash {receipt.head_hash[:16]}…)"
    if not _attested(receipt, signers):
        return "unattested", (
            f"the head {shown} in the receipt of {who} is not signed by the lineage-signing "
            "certificate given: the receipt belongs to another ledger or was forged"
        )
    records = ledger.records
    if receipt.head_seq >= len(records):
        return "truncated", (
            f"the ledger ends at seq {len(records) - 1}, but {who} was shown the record at "
            f"{shown}, signed by the lineage key: records were removed from the end"
        )
    at_seq = records[receipt.head_seq]
    if at_seq["hash"] != receipt.head_hash:
        return "rewritten", (
            f"the record at seq {receipt.head_seq} ({_describe(at_seq)}, hash "
            f"{at_seq['hash'][:16]}…) is not the one {who} was shown ({shown}, signed by the "
            f"lineage key): the ledger was rewritten at or before seq {receipt.head_seq}"
        )
    return _update_finding(ledger, receipt, who)


def _entries_of(body: Mapping[str, Any], key: str, site: str) -> list[Mapping[str, Any]]:
    """The entries of list ``body[key]`` that name ``site``."""
    entries = body.get(key)
    return [e for e in entries if isinstance(e, Mapping) and e.get("site") == site] if isinstance(entries, list) else []


def _update_finding(ledger: _Ledger, receipt: Receipt, who: str) -> tuple[str, str]:
    """(status, detail) of a receipt whose head the ledger holds: is its update accounted for?"""
    update = f"update {receipt.update_digest[:16]}…"
    later = ledger.after(receipt.head_seq, receipt.run_id)
    this_round = [r for r in later if r["body"].get("round") == receipt.round]
    for record in this_round:
        body, where = record["body"], f"seq {record['seq']}"
        if record["type"] == "update_rejected" and body.get("site") == receipt.site:
            if body.get("update_digest") == receipt.update_digest:
                return "witnessed", f"{who}: {update} recorded as rejected at {where}"
            return "rewritten", (
                f"the update_rejected record at {where} names update "
                f"{str(body.get('update_digest'))[:16]}… of {who}, which sent {update}"
            )
        if record["type"] != "round_committed":
            continue
        listed = _entries_of(body, "contributions", receipt.site)
        if any(c.get("update_digest") == receipt.update_digest for c in listed):
            return "witnessed", f"{who}: {update} is a contribution of the round record at {where}"
        if listed:
            return "rewritten", (
                f"the round record at {where} lists update "
                f"{str(listed[0].get('update_digest'))[:16]}… for {who}, which sent {update}"
            )
        failed = _entries_of(body, "failed", receipt.site)
        if failed:
            return "unacknowledged", (
                f"the round record at {where} lists {who} as failed "
                f"({failed[0].get('reason')}): its {update} was not used"
            )
        return "rewritten", f"the round record at {where} does not list the {update} of {who}"
    failure = next((r for r in later if r["type"] == "run_failed"), None)
    if failure is not None:
        return "uncommitted", (
            f"run {receipt.run_id} failed at seq {failure['seq']} before committing round "
            f"{receipt.round}; {who} sent {update}"
        )
    resumed = ledger.resumed_by(receipt.head_seq, receipt.run_id)
    if resumed is not None:
        return "uncommitted", (
            f"run {receipt.run_id} was resumed by run {resumed['run_id']} (seq "
            f"{resumed['seq']}) before committing round {receipt.round}; {who} sent {update}"
        )
    return "dropped", (
        f"no record after seq {receipt.head_seq} accounts for the {update} of {who}: the ledger was "
        "cut after the site's update, or the aggregator stopped before committing the round "
        "(if the run is still going, check again when it has ended)"
    )


def check_receipts(
    records: Sequence[Mapping[str, Any]],
    receipts: Sequence[LocatedReceipt],
    signer_certificates: Sequence[x509.Certificate],
) -> ReceiptReport:
    """Check a verified ledger's records against the receipts sites kept.

    Parameters
    ----------
    records
        The ledger's records in order (index = seq), after `fedgen.lineage.verify` passed.
    receipts
        The receipts, from `collect_receipts`.
    signer_certificates
        The lineage-signing certificates the ledger was verified with: a receipt's head
        must carry a signature by one of them to count as evidence.

    Returns
    -------
    ReceiptReport
        One finding per receipt; ``ok`` unless a receipt shows a truncated, rewritten or
        dropped record.
    """
    ledger = _Ledger(records)
    return ReceiptReport(
        [
            ReceiptFinding(located.source, located.receipt, *_finding(ledger, located.receipt, signer_certificates))
            for located in receipts
        ]
    )
