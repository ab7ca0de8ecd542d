"""The ledger file format: canonical encoding, record hashes, signatures, lines, torn tails.

This is what an auditor re-implements a verifier from, together with the checks
`fedgen.lineage.verify` lists.

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

Bytes after the last ``\\n`` are what a writer killed in the middle of an append leaves:
a torn tail, which is not an error (the record was never acknowledged). A tail that
cannot be such a prefix of a record (it does not start like one, or holds a whole record
followed by more bytes) is an error.

What sites sign
---------------
Each round's train instructions carry the ledger head when the round was configured (its
``seq``, ``hash`` and ``signature``, and the lineage-signing certificate) and the number
the ledger records the round under (a resumed run numbers its rounds on). A site signs,
with its certificate key (`fedgen.pki.sign_message`), the `witness_statement`: the
canonical encoding of ``{"head_hash": hex or null, "head_seq": int or null, "purpose":
"fedgen lineage witness v1", "round": int, "run_id": str, "update_digest": hex}``, and
keeps a receipt of it (`fedgen.lineage.receipts`). The round record's ``ledger_head`` and
``run_id``, the contribution's ``update_digest`` and the round rebuild that statement.

Bodies
------
The format does not fix bodies: `verify` and `export_prov` read only these keys, each
optional unless said otherwise (the bodies fedgen writes, which hold them and more, are
`fedgen.lineage.records`):

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
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fedgen.errors import FedgenError

RECORD_TYPES = (
    "run_started",
    "round_committed",
    "update_rejected",
    "site_refused",
    "model_approved",
    "run_finished",
    "run_failed",
)
RECORD_FIELDS = ("body", "hash", "prev", "run_id", "seq", "signature", "signer", "time", "type")
GENESIS_PREV = "0" * 64
WITNESS_PURPOSE = "fedgen lineage witness v1"

StrPath = str | os.PathLike[str]

HEX64 = re.compile(r"[0-9a-f]{64}")
# Every canonical record line starts like this ("body" sorts first), so a torn tail does too.
_RECORD_START = b'{"body":'


class LineageError(FedgenError, ValueError):
    """A lineage ledger cannot be written or read; the message names the file or line."""


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
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise LineageError(
            f"not representable as lineage JSON ({exc}); record NaN or infinity "
            "as null or a string, and numpy values as plain numbers"
        ) from None


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical encoding of ``record`` without ``hash`` and ``signature``."""
    unsigned = {key: value for key, value in record.items() if key not in ("hash", "signature")}
    return hashlib.sha256(canonical_encoding(unsigned)).hexdigest()


def plain_json(body: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` as the JSON object a reader parses back from its canonical encoding."""
    # A round trip turns tuples into lists and int keys into strings, so the record hashed
    # is the record a reader parses back (int keys would otherwise sort differently).
    plain = json.loads(canonical_encoding(body))
    if not isinstance(plain, dict):
        raise LineageError(f"a record body must be a JSON object, not {type(body).__name__}")
    return plain


def decode_signature(text: str) -> bytes | None:
    """The bytes of canonical standard base64 ``text``; None if it is not exactly that."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    # Spare bits in the last character would let two texts decode to the same bytes.
    return raw if base64.b64encode(raw).decode("ascii") == text else None


def parse_time(text: Any) -> datetime | None:
    """``text`` as a UTC datetime if it is an ISO 8601 string with a zero offset, else None."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    offset = moment.utcoffset()
    return moment if offset is not None and not offset else None


def is_hex_digest(value: Any) -> bool:
    return isinstance(value, str) and HEX64.fullmatch(value) is not None


def is_count(value: Any) -> bool:
    """True for a JSON integer >= 0 (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---------------------------------------------------------------------------- body members


def mapping_member(body: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    """``body[key]`` if present: an object (see *Bodies*) or null."""
    value = body.get(key)
    if value is not None and not isinstance(value, Mapping):
        raise LineageError(f"body member {key!r} must be an object")
    return value


def digest_member(body: Mapping[str, Any], key: str) -> str | None:
    """``body[key]["digest"]`` if present, checked to be a SHA-256 hex digest."""
    member = mapping_member(body, key)
    if member is None or "digest" not in member:
        return None
    if not is_hex_digest(member["digest"]):
        raise LineageError(f"{key}.digest {member['digest']!r:.80} is not a SHA-256 hex digest")
    return member["digest"]


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


def witness_statement(
    run_id: str, server_round: int, head_seq: int | None, head_hash: str | None, update_digest: str
) -> bytes:
    """The bytes a site signs for a round: its update and the ledger head it was shown.

    Both sides build it here: the site to sign it, the aggregator's recorder and `verify`
    to check the signature, from the round record (see *What sites sign* above).
    """
    return canonical_encoding(
        {
            "purpose": WITNESS_PURPOSE,
            "run_id": run_id,
            "round": server_round,
            "head_seq": head_seq,
            "head_hash": head_hash,
            "update_digest": update_digest,
        }
    )


# ---------------------------------------------------------------------------- lines


def split_ledger(data: bytes) -> tuple[list[bytes], bytes]:
    """The whole lines of a ledger (without their newlines) and the bytes after the last one."""
    *lines, tail = data.split(b"\n")
    return lines, tail


def read_ledger(path: Path) -> tuple[list[bytes], bytes]:
    """`split_ledger` of the file at ``path``.

    Raises
    ------
    LineageError
        If the file is missing or cannot be read.
    """
    try:
        return split_ledger(path.read_bytes())
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
        "seq": is_count,
        "type": lambda v: v in RECORD_TYPES,
        "time": lambda v: parse_time(v) is not None,
        "run_id": lambda v: isinstance(v, str) and bool(v),
        "body": lambda v: isinstance(v, dict),
        "prev": is_hex_digest,
        "hash": is_hex_digest,
        "signer": is_hex_digest,
        "signature": lambda v: isinstance(v, str),
    }
    problems += [
        f"invalid {name} {record[name]!r:.80}"
        for name, valid in checks.items()
        if name in record and not valid(record[name])
    ]
    return problems


def decode_line(raw: bytes) -> dict[str, Any]:
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


def check_chain(record: dict[str, Any], position: int, prev_hash: str) -> None:
    """Check seq, prev and hash of a well-formed record at ``position``."""
    if record["seq"] != position:
        raise LineageError(
            f"the record holds seq {record['seq']} where seq {position} belongs: "
            "a record was deleted, duplicated or moved"
        )
    if record["prev"] != prev_hash:
        raise LineageError(
            f"prev {record['prev'][:16]}… is not the hash of the record before it "
            f"({prev_hash[:16]}…): the chain is broken"
        )
    if record["hash"] != record_hash(record):
        raise LineageError("the hash does not match the record's contents: the record was changed")


def tail_problem(tail: bytes) -> str | None:
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


def location(line: int) -> str:
    """How messages name a line: ``line 4 (seq 3)``."""
    return f"line {line} (seq {line - 1})"


def read_records(path: StrPath) -> list[dict[str, Any]]:
    """The well-formed records of a ledger, in file order; a torn tail is left out.

    Hashes, signatures and the chain are not checked here: that is `verify`. The bodies
    are left as they are; `fedgen.lineage.records` types them.

    Raises
    ------
    LineageError
        If the file cannot be read or a whole line is not a well-formed record.
    """
    path = Path(path)
    lines, _ = read_ledger(path)
    records = []
    for number, raw in enumerate(lines, start=1):
        try:
            records.append(decode_line(raw))
        except LineageError as exc:
            raise LineageError(f"{path}: {location(number)}: {exc}") from None
    return records
