"""`fedgen certs`: the consortium PKI from the command line (a thin layer over `fedgen.pki`)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import pki
from .output import ReportingGroup, err, fail


class CertsGroup(ReportingGroup):
    bad_input = (OSError,)  # a consortium folder or file this user cannot read or write


certs_app = typer.Typer(
    cls=CertsGroup,
    no_args_is_help=True,
    add_completion=False,
    help="Consortium PKI: CA, aggregator, lineage-signing and site certificates, revocation.",
)
issue_app = typer.Typer(
    cls=CertsGroup,
    no_args_is_help=True,
    help="Issue the aggregator's server certificate, its lineage-signing certificate or a site's client certificate.",
)
certs_app.add_typer(issue_app, name="issue")

out = Console()

Reason = Enum("Reason", {r: r.replace("_", "-") for r in pki.REVOCATION_REASONS}, type=str)

KEY_WARNING = "Private keys (.key) must never be committed or copied off the machine they belong to."


def _dir_option() -> Any:
    return typer.Option(pki.DEFAULT_DIR, "--dir", help="Consortium folder.")


def _force_option(what: str) -> Any:
    return typer.Option(False, "--force", help=f"Replace {what}.")


def _say(message: str) -> None:
    out.print(escape(message), highlight=False, soft_wrap=True)


def _expiry(path: Path) -> str:
    return pki.load_certificate(path).not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")


@certs_app.command("init")
def init(
    consortium: str = typer.Option(..., "--consortium", help="Consortium name (the CA's O)."),
    folder: Path = _dir_option(),
    days: int = typer.Option(pki.CA_DAYS, "--days", min=1, help="CA validity in days."),
    force: bool = _force_option("an existing CA (every certificate it issued must then be re-issued)"),
) -> None:
    """Create the consortium CA, an empty CRL and index.json."""
    ca_cert = pki.init_consortium(folder, consortium, days=days, force=force)
    files = pki.layout(folder)
    _say(
        f"Consortium {consortium!r}: CA certificate {ca_cert} (valid until {_expiry(ca_cert)}), "
        f"CA key {files.ca_key}, CRL {files.crl}, index {files.index}."
    )
    _say(
        f"Give {ca_cert} to every site and the aggregator. {files.ca_key} stays on this machine, "
        f"offline if you can. {KEY_WARNING}"
    )


@issue_app.command("aggregator")
def issue_aggregator(
    host: list[str] = typer.Option(
        ...,
        "--host",
        help="DNS name or IP address the sites connect to; comma-separated or repeated. The first one becomes the CN.",
    ),
    folder: Path = _dir_option(),
    days: int = typer.Option(pki.CERT_DAYS, "--days", min=1, help="Validity in days."),
    force: bool = _force_option("the current aggregator certificate (the old one is revoked)"),
) -> None:
    """Issue the aggregator's TLS server certificate."""
    hosts = [h.strip() for value in host for h in value.split(",")]
    cert = pki.issue_aggregator(folder, hosts, days=days, force=force)
    _say(
        f"Aggregator certificate for {', '.join(hosts)}: {cert} and key {pki.layout(folder).aggregator_key} "
        f"(valid until {_expiry(cert)})."
    )
    _say(f"Install both on the aggregator machine only. {KEY_WARNING}")
    if not pki.layout(folder).lineage_cert.exists():
        _say("The ledger is signed with a certificate of its own: issue it with `fedgen certs issue lineage`.")


@issue_app.command("lineage")
def issue_lineage(
    folder: Path = _dir_option(),
    days: int = typer.Option(pki.CERT_DAYS, "--days", min=1, help="Validity in days."),
    force: bool = _force_option("the current lineage-signing certificate (the old one is revoked as superseded)"),
) -> None:
    """Issue the aggregator's lineage-signing certificate (its own key; signs the lineage ledger only)."""
    cert = pki.issue_lineage(folder, days=days, force=force)
    _say(
        f"Lineage-signing certificate: {cert} and key {pki.layout(folder).lineage_key} "
        f"(valid until {_expiry(cert)}). Name both in aggregator.toml's [lineage] table."
    )
    _say(f"Install the key on the aggregator machine only; give {cert} to auditors. {KEY_WARNING}")
    if force:
        _say(
            "Keep the old certificate for auditors: records it signed verify only with it "
            "(`fedgen lineage verify --cert OLD --cert NEW`)."
        )


@issue_app.command("site")
def issue_site(
    site_id: str = typer.Argument(..., help="Site id: the certificate's CN and the site's identity."),
    folder: Path = _dir_option(),
    days: int = typer.Option(pki.CERT_DAYS, "--days", min=1, help="Validity in days."),
    force: bool = _force_option("the site's certificate (key rotation: the old one is revoked)"),
) -> None:
    """Issue a site's TLS client certificate."""
    cert = pki.issue_site(folder, site_id, days=days, force=force)
    key = pki.layout(folder).site_key(site_id)
    _say(f"Site {site_id!r}: certificate {cert} and key {key} (valid until {_expiry(cert)}).")
    if force:
        _say(
            f"Any earlier certificate for {site_id!r} is revoked in {pki.layout(folder).crl}; copy it to "
            "the aggregator and restart its Fleet listener."
        )
    _say(f"Hand {key} to the site through its own secure channel, then delete it here. {KEY_WARNING}")


@certs_app.command("revoke")
def revoke(
    site_id: str = typer.Argument(None, help="Site whose current certificate to revoke."),
    lineage: bool = typer.Option(False, "--lineage", help="Revoke the lineage-signing certificate instead."),
    reason: Reason = typer.Option(Reason.unspecified, "--reason", help="Revocation reason (RFC 5280)."),
    folder: Path = _dir_option(),
) -> None:
    """Revoke a site's certificate (or, with --lineage, the lineage-signing one) and re-sign the CRL."""
    if lineage == (site_id is not None):
        fail("name the site to revoke, or pass --lineage for the lineage-signing certificate (not both)")
    if lineage:
        revoked = pki.revoke_lineage(folder, reason.value)
    else:
        revoked = pki.revoke_site(folder, site_id, reason.value)
    crl = pki.layout(folder).crl
    what = "the lineage-signing certificate" if lineage else f"site {site_id!r}"
    _say(f"Revoked {what} (serial {revoked.serial}, reason {revoked.reason}); {crl} re-signed.")
    if lineage:
        _say(
            f"Records signed with it from now on fail `fedgen lineage verify --ca … --crl {crl}`; issue a new "
            "one with `fedgen certs issue lineage --force` and copy it and its key to the aggregator."
        )
    else:
        _say(f"Copy {crl} to the aggregator and restart its Fleet listener: the CRL is read when TLS starts.")


@certs_app.command("refresh-crl")
def refresh_crl(
    folder: Path = _dir_option(),
    days: int = typer.Option(pki.CRL_DAYS, "--days", min=1, help="Days until the CRL's next update."),
) -> None:
    """Re-sign the CRL before it lapses (a lapsed CRL makes every TLS handshake fail)."""
    crl = pki.refresh_crl(folder, days=days)
    next_update = pki.load_crl(crl).next_update_utc
    _say(f"{crl} re-signed; next update {next_update:%Y-%m-%d %H:%M UTC}. Copy it to the aggregator.")


def _table(infos: list[pki.CertInfo], now: datetime) -> Table:
    table = Table(title="fedgen certificates", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    # Short fixed columns never wrap, so an 80-column terminal folds subjects instead.
    for header in ("kind", "subject", "serial", "expires", "days left", "revoked"):
        fixed = header not in ("subject", "revoked")
        table.add_column(header, no_wrap=fixed, overflow="fold", justify="right" if header == "days left" else "left")
    for info in infos:
        expires = info.not_after.strftime("%Y-%m-%d") if info.not_after else "?"
        days_left = str((info.not_after - now).days) if info.not_after else "?"
        reason = (info.reason or "").replace("_", "-")
        revoked = f"{reason} {info.revoked_at:%Y-%m-%d}" if info.revoked_at else "no"
        # 48 random bits of the serial tell certificates apart; --json has all of it.
        serial = f"{info.serial[:12]}…" if len(info.serial) > 12 else info.serial
        table.add_row(*(escape(cell) for cell in (info.kind, info.subject, serial, expires, days_left, revoked)))
    return table


@certs_app.command("list")
def list_(
    folder: Path = _dir_option(),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array instead of a table."),
) -> None:
    """List every certificate issued, with expiry and revocation, checked against the files."""
    infos = pki.list_certificates(folder)
    if as_json:
        print(json.dumps([info.as_dict() for info in infos], indent=2))
    else:
        out.print(_table(infos, datetime.now(timezone.utc)))
    for info in infos:
        if info.problem:
            err.print(f"[bold yellow]warning:[/] {escape(info.problem)}", highlight=False, soft_wrap=True)
