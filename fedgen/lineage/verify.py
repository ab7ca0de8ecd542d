"""Verifying a ledger: the auditor's walk along the chain, stopping at the first broken record.

Verification
------------
Lines are read in order (the format is `fedgen.lineage.format`) and the walk stops at the
first record that fails a check, reporting its line number (1-based) and the seq its
position calls for (line - 1):

1. The line is UTF-8 JSON, an object with exactly the members of a record, each of the
   right kind, and the line is its canonical encoding.
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

Bodies are read as the format's *Bodies* section describes, no further: a ledger whose
bodies hold only those members verifies. A torn tail is no failure and is reported as
``incomplete_tail``. Removing whole records from the end of a ledger, or re-chaining and
re-signing it with the genuine key, cannot be seen from the ledger alone: the sites'
receipts show it (`fedgen.lineage.receipts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from fedgen import pki

from .format import (
    GENESIS_PREV,
    LineageError,
    StrPath,
    check_chain,
    decode_line,
    decode_signature,
    digest_member,
    is_count,
    is_hex_digest,
    location,
    mapping_member,
    parse_time,
    read_ledger,
    tail_problem,
    witness_statement,
)


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


class _Auditor:
    """What `verify` knows while it walks a ledger: trust anchors, checked counts, the chain so far."""

    def __init__(
        self,
        signer_certificates: Sequence[x509.Certificate],
        checkpoints_dir: Path | None,
        ca_certificate: x509.Certificate | None,
        crl: x509.CertificateRevocationList | None,
    ) -> None:
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
        moment = parse_time(record["time"])
        certificate = self.signers.get(record["signer"])
        if certificate is None:
            expected = ", ".join(f"{fp[:16]}…" for fp in self.signers)
            raise LineageError(
                f"the record was signed by {record['signer'][:16]}…, not by the lineage-signing "
                f"certificate given ({expected}): the record was re-signed by someone else"
            )
        try:
            pki.check_lineage_signer(certificate)
        except pki.PKIError as exc:
            raise LineageError(f"the record's signer is refused: {exc}") from None
        signature = decode_signature(record["signature"])
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
            raise LineageError(
                f"{what} (serial {certificate.serial_number:x}) was revoked on "
                f"{revoked_at.isoformat()}, before this record was signed"
            )

    def _check_round(self, record: dict[str, Any], moment: datetime | None) -> None:
        body, run_id = record["body"], record["run_id"]
        head = self._ledger_head(body)
        model_in, model_out = digest_member(body, "model_in"), digest_member(body, "model_out")
        previous = self.model_out_of_run.get(run_id)
        if model_in is not None and previous is not None and model_in != previous:
            raise LineageError(
                f"model_in {model_in[:16]}… is not the model_out {previous[:16]}… of run "
                f"{run_id!r}'s previous committed round: a round is missing or the "
                "global model was swapped between rounds"
            )
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
        head = mapping_member(body, "ledger_head")
        if head is None:
            return None, None
        seq, head_hash = head.get("seq"), head.get("hash")
        if not is_count(seq) or not is_hex_digest(head_hash):
            raise LineageError(f"ledger_head {dict(head)!r:.120} is not a seq and a hash")
        if seq >= len(self.hashes) or self.hashes[seq] != head_hash:
            raise LineageError(
                f"ledger_head names seq {seq} with hash {head_hash[:16]}…, which is not a record "
                "before this one in this ledger"
            )
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
            raise LineageError(
                f"checkpoint {path} holds a model with digest {actual[:16]}…, not the "
                f"model_out {model_digest[:16]}… this record commits: the file was "
                "altered or swapped"
            )
        self.checkpoints_checked += 1

    def _check_contribution(
        self,
        contribution: Any,
        moment: datetime | None,
        run_id: str,
        server_round: Any,
        head: tuple[int | None, str | None],
    ) -> None:
        if not isinstance(contribution, Mapping) or not isinstance(contribution.get("site"), str):
            raise LineageError("every contribution must be an object with a string 'site'")
        site = contribution["site"]
        pem, signature_text = contribution.get("certificate"), contribution.get("signature")
        if pem is None or signature_text is None:
            return  # nothing to check it against
        where = f"contribution of site {site!r}"
        digest = contribution.get("update_digest")
        if not is_hex_digest(digest):
            raise LineageError(f"{where} has no valid update_digest ({digest!r:.80})")
        if not is_count(server_round):
            raise LineageError(f"a round with signed contributions needs an integer 'round', not {server_round!r:.40}")
        try:
            certificate = x509.load_pem_x509_certificate(str(pem).encode("utf-8"))
        except ValueError as exc:
            raise LineageError(f"{where} carries a certificate that is not PEM ({exc})") from None
        recorded = contribution.get("fingerprint")
        if recorded is not None and recorded != pki.fingerprint(certificate):
            raise LineageError(
                f"{where} names certificate {str(recorded)[:16]}… but carries {pki.fingerprint(certificate)[:16]}…"
            )
        statement = witness_statement(run_id, server_round, *head, digest)
        signature = decode_signature(signature_text) if isinstance(signature_text, str) else None
        if signature is None or not pki.verify_message_signature(certificate, statement, signature):
            raise LineageError(
                f"{where}: the site signature over update {digest[:16]}… and ledger head "
                f"{head[1][:16] + '…' if head[1] else 'none'} is not valid under the "
                "certificate recorded with it"
            )
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

    def report(
        self,
        *,
        records: int,
        head: str | None,
        incomplete_tail: bool,
        error: str | None = None,
        error_line: int | None = None,
    ) -> VerifyReport:
        return VerifyReport(
            ok=error is None,
            records=records,
            head_hash=head,
            error=error,
            error_seq=None if error_line is None else error_line - 1,
            error_line=error_line,
            incomplete_tail=incomplete_tail,
            checkpoints_checked=self.checkpoints_checked,
            site_signatures_checked=self.site_signatures_checked,
        )


def verify(
    path: StrPath,
    signer_certificate: x509.Certificate | Sequence[x509.Certificate],
    *,
    checkpoints_dir: StrPath | None = None,
    ca_certificate: x509.Certificate | None = None,
    crl: x509.CertificateRevocationList | None = None,
) -> VerifyReport:
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
    certificates = (
        [signer_certificate] if isinstance(signer_certificate, x509.Certificate) else list(signer_certificate)
    )
    if crl is not None:
        if ca_certificate is None:
            raise LineageError("a CRL can only be checked against the CA that signed it: give the CA as well")
        try:
            pki.check_crl(crl, ca_certificate)
        except pki.PKIError as exc:
            raise LineageError(f"the CRL cannot be used: {exc}") from None
    auditor = _Auditor(certificates, None if checkpoints_dir is None else Path(checkpoints_dir), ca_certificate, crl)
    lines, tail = read_ledger(Path(path))
    head = None
    for position, raw in enumerate(lines):
        try:
            record = decode_line(raw)
            check_chain(record, position, head or GENESIS_PREV)
            auditor.check(record)
        except LineageError as exc:
            line = position + 1
            return auditor.report(
                records=position, head=head, incomplete_tail=False, error=f"{location(line)}: {exc}", error_line=line
            )
        head = record["hash"]
    problem = tail_problem(tail) if tail else None
    if problem:
        line = len(lines) + 1
        return auditor.report(
            records=len(lines), head=head, incomplete_tail=False, error=f"{location(line)}: {problem}", error_line=line
        )
    return auditor.report(records=len(lines), head=head, incomplete_tail=bool(tail))
