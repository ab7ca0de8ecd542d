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
update and keeps a receipt of it, so that the holder of the signing key cannot rewrite
or truncate the history the sites saw without the receipts showing it.

Modules
-------
format
    The file format (what an auditor re-implements): canonical encoding, record hashes,
    signatures, lines and torn tails, the statement sites sign; reading records.
records
    The bodies fedgen writes, one type per record type.
writer
    `LineageWriter`, the ledger's only appender: locked, signed, crash-safe appends.
verify
    `verify`, the auditor's walk along the chain, and its `VerifyReport`.
receipts
    The sites' receipts of the heads they witnessed, and the auditor's check of them.
prov
    `export_prov`: the ledger as a W3C PROV-JSON document.
"""

from .format import (
    GENESIS_PREV,
    RECORD_FIELDS,
    RECORD_TYPES,
    WITNESS_PURPOSE,
    LedgerHead,
    LineageError,
    canonical_encoding,
    read_records,
    record_hash,
    witness_statement,
)
from .prov import PROV_PREFIXES, export_prov
from .verify import VerifyReport, verify
from .writer import LineageWriter

__all__ = [
    "GENESIS_PREV",
    "PROV_PREFIXES",
    "RECORD_FIELDS",
    "RECORD_TYPES",
    "WITNESS_PURPOSE",
    "LedgerHead",
    "LineageError",
    "LineageWriter",
    "VerifyReport",
    "canonical_encoding",
    "export_prov",
    "read_records",
    "record_hash",
    "verify",
    "witness_statement",
]
