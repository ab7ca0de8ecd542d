"""What a dishonest holder of a signing key can do to a ledger: re-chain and re-sign any records."""

from __future__ import annotations

import base64
import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedgen import pki
from fedgen.lineage import GENESIS_PREV, canonical_encoding, record_hash


def forge_ledger(
    path: Path, records: Sequence[dict[str, Any]], key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate
) -> list[dict[str, Any]]:
    """Write ``records`` to ``path`` as a ledger that verifies under ``certificate``.

    seq, prev, hash, signer and signature are made anew; a round's ``ledger_head`` is
    pointed at the forged record it named (null if that record is gone), and, as the
    sites' signatures covered the old head, their signatures and certificates are
    dropped from its contributions. Times and everything else are kept.
    """
    forged: list[dict[str, Any]] = []
    renamed: dict[str, dict[str, Any]] = {}  # original hash -> forged record
    prev = GENESIS_PREV
    for seq, original in enumerate(records):
        record = {name: copy.deepcopy(value) for name, value in original.items() if name not in ("hash", "signature")}
        head = record["body"].get("ledger_head") if record["type"] == "round_committed" else None
        target = renamed.get(head["hash"]) if head is not None else None
        if head is not None and (target is None or (target["seq"], target["hash"]) != (head["seq"], head["hash"])):
            record["body"]["ledger_head"] = {"seq": target["seq"], "hash": target["hash"]} if target else None
            for contribution in record["body"].get("contributions", []):
                contribution.update(signature=None, certificate=None)
        record.update(seq=seq, prev=prev, signer=pki.fingerprint(certificate))
        record["hash"] = record_hash(record)
        record["signature"] = base64.b64encode(pki.sign_digest(key, record["hash"])).decode("ascii")
        renamed[original["hash"]] = record
        forged.append(record)
        prev = record["hash"]
    path.write_bytes(b"".join(canonical_encoding(record) + b"\n" for record in forged))
    return forged
