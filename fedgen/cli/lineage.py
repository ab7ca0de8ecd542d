"""`fedgen lineage …` and `fedgen model …`: read, verify, export and act on the ledger.

Files can be named one by one, or found from an aggregator config (``--config``: its
state folder's ``lineage.jsonl`` and ``checkpoints/``, its lineage-signing certificate and
key, its CA and CRL) or, for a simulation, next to the ledger (``pki/lineage.pem``,
``checkpoints/``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer
from cryptography import x509
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import pki
from ..config import AggregatorConfig, load_toml
from ..lineage import LineageError, VerifyReport, export_prov, read_records, verify
from ..lineage.receipts import STATUSES, ReceiptReport, check_receipts, collect_receipts
from ..lineage.records import (
    Body,
    ModelApproved,
    RoundCommitted,
    RoundEvent,
    RunFailed,
    RunFinished,
    RunStarted,
    SiteRefused,
    UpdateRejected,
    parse_record,
)
from ..model_release import approve, export_model
from ..state_files import CHECKPOINTS_DIR, LINEAGE_FILE
from .output import ReportingGroup, err, fail

lineage_app = typer.Typer(
    cls=ReportingGroup, help="The signed, hash-chained lineage of every run and round.", no_args_is_help=True
)
model_app = typer.Typer(
    cls=ReportingGroup, help="Approve a committed model (human oversight) and export it.", no_args_is_help=True
)

LEDGER = typer.Option(None, "--ledger", help="lineage.jsonl (default: from --config).")
CONFIG = typer.Option(None, "--config", "-c", help="aggregator.toml: finds ledger, checkpoints, certificates.")
CERT = typer.Option(None, "--cert", help="The lineage-signing certificate that signs the ledger.")
CA = typer.Option(None, "--ca", help="Consortium CA: also check the signer's and sites' certificates.")
CRL = typer.Option(None, "--crl", help="Consortium CRL (with --ca): refuse records signed after a revocation.")
CHECKPOINTS = typer.Option(
    None, "--checkpoints", help="Folder of round checkpoints: each one the ledger names must be there, digest intact."
)
RUN = typer.Option(None, "--run", help="Run id (default: the latest run in the ledger).")


@dataclass
class LedgerFiles:
    ledger: Path
    certificate: Path | None
    private_key: Path | None
    ca: Path | None
    checkpoints: Path | None
    crl: Path | None = None


def _files(
    ledger: Path | None,
    config: Path | None,
    cert: Path | None,
    ca: Path | None,
    checkpoints: Path | None,
    key: Path | None = None,
    crl: Path | None = None,
) -> LedgerFiles:
    """Explicit options first, then the aggregator config, then a simulation's layout."""
    if config is not None:
        aggregator = load_toml(config, AggregatorConfig)
        state = Path(aggregator.state_dir)
        ledger = ledger or state / LINEAGE_FILE
        cert, key = cert or aggregator.lineage.certificate, key or aggregator.lineage.private_key
        ca, crl = ca or aggregator.tls.ca_certificate, crl or aggregator.tls.crl
        checkpoints = checkpoints or state / CHECKPOINTS_DIR
    if ledger is None:
        fail("name the ledger with --ledger, or the aggregator with --config")
    simulation_pki = pki.layout(ledger.parent / "pki")
    if cert is None and simulation_pki.lineage_cert.exists():
        cert, key = simulation_pki.lineage_cert, key or simulation_pki.lineage_key
        ca = ca or simulation_pki.ca_cert
    if checkpoints is None and (ledger.parent / CHECKPOINTS_DIR).is_dir():
        checkpoints = ledger.parent / CHECKPOINTS_DIR
    return LedgerFiles(ledger, cert, key, ca, checkpoints, crl)


def _trust(files: LedgerFiles) -> tuple[x509.Certificate | None, x509.CertificateRevocationList | None]:
    """The CA and CRL to check certificates against, loaded (a CRL without a CA is refused)."""
    if files.crl is not None and files.ca is None:
        fail("--crl needs --ca: a CRL is checked against the CA that signed it")
    return (pki.load_certificate(files.ca) if files.ca else None, pki.load_crl(files.crl) if files.crl else None)


def _records(ledger: Path) -> list[dict]:
    try:
        return read_records(ledger)
    except LineageError as exc:
        fail(str(exc))


@lineage_app.command("show")
def show(
    ledger: Path = LEDGER,
    config: Path = CONFIG,
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON lines."),
) -> None:
    """A readable table of every record: runs, rounds, contributions, rejections, approvals."""
    files = _files(ledger, config, None, None, None)
    records = _records(files.ledger)
    if as_json:
        for record in records:
            print(json.dumps(record))
        return
    try:
        typed = [parse_record(record, source=files.ledger) for record in records]
    except LineageError as exc:
        fail(str(exc))
    table = Table(title=str(files.ledger))
    for column in ("seq", "time", "run", "event", "round", "model", "detail"):
        table.add_column(column)
    for record in typed:
        body = record.body
        model, detail = _model_and_detail(body)
        table.add_row(
            str(record.seq),
            record.time[:19],
            record.run_id[-8:],
            record.type,
            str(body.round) if isinstance(body, RoundEvent) else "",
            model,
            escape(detail),
        )
    Console().print(table)


def _model_and_detail(body: Body) -> tuple[str, str]:
    """The model digest (shortened) and the detail a `lineage show` row gives for ``body``."""
    if isinstance(body, RoundCommitted):
        sites = [f"{c.site} n={c.examples} ε={c.epsilon:.2f}" for c in body.contributions]
        left_out = [
            f"{x.site} {kind}"
            for kind, entries in (("rejected", body.rejected), ("refused", body.refused), ("failed", body.failed))
            for x in entries
        ]
        accuracy = body.metrics.get("accuracy")
        return body.model_out.digest[:12], "; ".join(sites + left_out) + (
            f"; accuracy {accuracy:.4f}" if accuracy is not None else ""
        )
    if isinstance(body, (UpdateRejected, SiteRefused)):
        return "", f"{body.site}: {body.reason}"
    if isinstance(body, ModelApproved):
        return body.model_digest[:12], f"by {body.by}: {body.reason}"
    if isinstance(body, RunStarted):
        versions = ", ".join(f"{name} {version}" for name, version in body.versions.items())
        return "", f"{body.strategy.name}, {body.sites} sites, {versions}"
    if isinstance(body, RunFinished):
        return body.model_digest[:12], ""
    assert isinstance(body, RunFailed), f"no row for {type(body).__name__}"
    return "", body.error


@lineage_app.command("verify")
def verify_command(
    ledger: Path = LEDGER,
    config: Path = CONFIG,
    cert: list[Path] = typer.Option(
        None,
        "--cert",
        help="The lineage-signing certificate that signs the "
        "ledger; repeat it for each one the ledger was signed with (renewals).",
    ),
    ca: Path = CA,
    crl: Path = CRL,
    checkpoints: Path = CHECKPOINTS,
    receipts: list[Path] = typer.Option(
        None,
        "--receipts",
        help="A site's state folder, a folder of receipts files collected from sites, or a receipts file; repeatable.",
    ),
) -> None:
    """Walk the chain: hashes, signer role, signatures, site signatures, checkpoint digests, receipts."""
    files = _files(ledger, config, cert[0] if cert else None, ca, checkpoints, crl=crl)
    if files.certificate is None:
        fail("name the lineage-signing certificate with --cert (or --config)")
    signers = [pki.load_certificate(path) for path in (cert or [files.certificate])]
    ca_certificate, revocations = _trust(files)
    collected = collect_receipts(receipts) if receipts else []
    report = verify(
        files.ledger, signers, checkpoints_dir=files.checkpoints, ca_certificate=ca_certificate, crl=revocations
    )
    if not report.ok:
        fail(
            f"{files.ledger}: BROKEN at record seq {report.error_seq} (line {report.error_line}): {report.error}",
            code=1,
        )
    _print_verified(files, report, trusted=ca_certificate is not None)
    if receipts:
        _report_receipts(check_receipts(read_records(files.ledger), collected, signers))


def _print_verified(files: LedgerFiles, report: VerifyReport, *, trusted: bool) -> None:
    tail = " (an incomplete last append was ignored)" if report.incomplete_tail else ""
    print(
        f"{files.ledger}: OK, {report.records} records, head {report.head_hash}; "
        f"{report.checkpoints_checked} checkpoint digests and {report.site_signatures_checked} "
        f"site signatures checked{tail}"
    )
    if not trusted:
        err.print(
            "note: no --ca given: the signer certificate was taken on trust, not checked against the consortium CA",
            highlight=False,
            soft_wrap=True,
        )
    if files.checkpoints is None:
        err.print("note: no checkpoints folder: model digests were not recomputed", highlight=False)


def _report_receipts(report: ReceiptReport) -> None:
    """Print every receipt that is not simply witnessed, then a summary; exit 1 on a failure."""
    for finding in report.findings:
        if finding.status != "witnessed":
            label = finding.status.upper() if finding.failed else f"note ({finding.status})"
            err.print(
                f"{escape(label)}: {escape(finding.source)}: {escape(finding.detail)}", highlight=False, soft_wrap=True
            )
    counts = ", ".join(f"{report.count(status)} {status}" for status in STATUSES if report.count(status))
    summary = f"receipts: {len(report.findings)} checked: {counts or 'none'}"
    if not report.ok:
        fail(f"{summary}: the ledger does not hold the history the sites witnessed", code=1)
    print(summary)


@lineage_app.command("export")
def export(
    ledger: Path = LEDGER,
    config: Path = CONFIG,
    format: str = typer.Option("prov-json", "--format", help="prov-json (W3C PROV-JSON)."),  # noqa: A002
    out: Path = typer.Option(None, "--out", help="File to write (default: stdout)."),
) -> None:
    """Export the lineage for compliance tools."""
    if format not in ("prov-json", "prov"):
        fail(f"unknown format {format!r}; supported: prov-json")
    files = _files(ledger, config, None, None, None)
    document = json.dumps(export_prov(files.ledger), indent=2)
    if out is None:
        print(document)
    else:
        out.write_text(document + "\n", encoding="utf-8")
        err.print(f"wrote {out}", highlight=False)


@model_app.command("approve")
def approve_command(
    round: int = typer.Option(..., "--round", min=1, help="The committed round whose model is approved."),  # noqa: A002
    by: str = typer.Option(..., "--by", help="Who approves (name, role)."),
    reason: str = typer.Option(..., "--reason", help="Why: the review that was done."),
    run: str = RUN,
    ledger: Path = LEDGER,
    config: Path = CONFIG,
    key: Path = typer.Option(None, "--key", help="Lineage-signing key that signs the ledger (default: from --config)."),
    cert: Path = CERT,
) -> None:
    """Record a signed approval of a round's model in the ledger."""
    files = _files(ledger, config, cert, None, None, key)
    if files.certificate is None or files.private_key is None:
        fail("the lineage-signing --key and --cert (or --config) are needed to sign the approval")
    record = approve(
        files.ledger,
        pki.load_private_key(files.private_key),
        pki.load_certificate(files.certificate),
        server_round=round,
        by=by,
        reason=reason,
        run_id=run,
    )
    print(
        f"approved run {record.run_id} round {round}: model {record.body.model_digest} "
        f"(record seq {record.seq}, hash {record.hash})"
    )


@model_app.command("export")
def export_command(
    round: int = typer.Option(..., "--round", min=1, help="The committed round to export."),  # noqa: A002
    out: Path = typer.Option(..., "--out", help="New folder for weights, config.json and MODEL_CARD.md."),
    run: str = RUN,
    ledger: Path = LEDGER,
    config: Path = CONFIG,
    cert: Path = CERT,
    ca: Path = CA,
    crl: Path = CRL,
    checkpoints: Path = CHECKPOINTS,
    allow_unapproved: bool = typer.Option(False, "--allow-unapproved", help="Export without an approval."),
    fmt: str = typer.Option(
        "adapters", "--format", help="Hugging Face runs: adapters (peft, for the same base) or merged (standalone)."
    ),
    base: Path = typer.Option(
        None, "--base", help="Hugging Face runs: your copy of the base checkpoint (checked against its digest)."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run modeling code shipped inside the base checkpoint."
    ),
) -> None:
    """Export a round's model with a model card (refuses unapproved rounds by default)."""
    files = _files(ledger, config, cert, ca, checkpoints, crl=crl)
    if files.certificate is None or files.checkpoints is None:
        fail("the lineage-signing --cert and --checkpoints (or --config) are needed")
    ca_certificate, revocations = _trust(files)
    path = export_model(
        files.ledger,
        pki.load_certificate(files.certificate),
        files.checkpoints,
        out,
        server_round=round,
        run_id=run,
        allow_unapproved=allow_unapproved,
        ca_certificate=ca_certificate,
        crl=revocations,
        fmt=fmt,
        base=base,
        trust_remote_code=trust_remote_code,
    )
    print(f"exported to {path}: " + ", ".join(sorted(p.name for p in path.iterdir())))
