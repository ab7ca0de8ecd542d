"""Human oversight before a model is used: approving a committed round and exporting it.

An approval is a signed ``model_approved`` record in the lineage ledger; an export is the
round's model with its configuration and a model card that cites the ledger's head
hash, each site's privacy spend and the approval. A built-in model exports as its
checkpoint; a model fine-tuned from a Hugging Face base exports, from the exporter's own
copy of that base (checked against the pinned digest), as peft adapters or as one merged
transformers model (`fedgen.hf.release`). Export refuses an unapproved round
unless told otherwise, and always refuses a ledger that does not verify or a copied
checkpoint whose model digest (tensors and header, model config included) is not the one
the ledger commits.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from . import atomic
from .errors import FedgenError
from .lineage import LineageError, LineageWriter, read_records, verify
from .lineage.records import ModelApproved, Record, RoundCommitted, RunStarted, records_of
from .model_config import HFModelConfig
from .params import model_file_digest, read_model_file

RELEASE_FILE = "fedgen-release.json"  # beside a Hugging Face export, whose config.json is transformers'


class ReleaseError(FedgenError, ValueError):
    """The round, run or ledger does not allow the approval or export asked for."""


@dataclass(frozen=True)
class RoundEntry:
    """A committed round of a run, and the start of that run."""

    run_id: str
    round: int
    record: Record[RoundCommitted]
    run_started: Record[RunStarted]


def find_round(ledger: Path, server_round: int, run_id: str | None = None) -> RoundEntry:
    """The ``round_committed`` record of ``server_round`` in ``run_id`` (default: the latest run)."""
    records = read_records(ledger)
    runs = [record["run_id"] for record in records if record["type"] == RunStarted.TYPE]
    if not runs:
        raise ReleaseError(f"{ledger}: no run in this ledger")
    run_id = run_id or runs[-1]
    if run_id not in runs:
        raise ReleaseError(f"{ledger}: no run {run_id!r}; runs: {', '.join(dict.fromkeys(runs))}")
    started = records_of(records, RunStarted, run_id=run_id, source=ledger)[-1]
    for record in records_of(records, RoundCommitted, run_id=run_id, source=ledger):
        if record.body.round == server_round:
            return RoundEntry(run_id, server_round, record, started)
    raise ReleaseError(f"{ledger}: run {run_id} has no committed round {server_round}")


def approvals_of(ledger: Path, entry: RoundEntry) -> list[Record[ModelApproved]]:
    """``model_approved`` records for exactly this round's model."""
    approvals = records_of(read_records(ledger), ModelApproved, run_id=entry.run_id, source=ledger)
    return [a for a in approvals if a.body.model_digest == entry.record.body.model_out.digest]


def approve(
    ledger: Path,
    private_key: ec.EllipticCurvePrivateKey,
    certificate: x509.Certificate,
    *,
    server_round: int,
    by: str,
    reason: str,
    run_id: str | None = None,
) -> Record[ModelApproved]:
    """Append an approval of a committed round's model, signed with the lineage-signing key; return the record."""
    if not by.strip() or not reason.strip():
        raise ReleaseError("an approval needs who approves (--by) and why (--reason)")
    entry = find_round(ledger, server_round, run_id)
    model_out = entry.record.body.model_out
    body = ModelApproved(
        round=server_round,
        by=by,
        reason=reason,
        model_digest=model_out.digest,
        checkpoint=model_out.checkpoint,
        round_record=entry.record.hash,
    )
    try:
        with LineageWriter.open(ledger, private_key, certificate) as writer:
            return writer.append_body(body, entry.run_id)
    except LineageError as exc:
        raise ReleaseError(str(exc)) from None


def privacy_spend(ledger: Path, entry: RoundEntry) -> dict[str, dict[str, float]]:
    """Each site's latest reported ε (and δ) in the run, up to and including the round."""
    spend: dict[str, dict[str, float]] = {}
    for record in records_of(read_records(ledger), RoundCommitted, run_id=entry.run_id, source=ledger):
        if record.body.round <= entry.round:
            for c in record.body.contributions:
                if c.dp:
                    spend[c.site] = {"epsilon": c.epsilon, "delta": c.delta}
    return spend


def export_model(
    ledger: Path,
    signer_certificate: x509.Certificate,
    checkpoints: Path,
    out: Path,
    *,
    server_round: int,
    run_id: str | None = None,
    allow_unapproved: bool = False,
    ca_certificate: x509.Certificate | None = None,
    crl: x509.CertificateRevocationList | None = None,
    fmt: str = "adapters",
    base: Path | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Write weights, configuration and a model card for a committed round into ``out``.

    A run that fine-tuned a Hugging Face base needs ``base``, this side's copy of it, and
    is written in ``fmt`` (``"adapters"`` or ``"merged"``).

    ``out`` is written whole or not at all: the files go to a temporary folder beside it,
    which is renamed to ``out`` once the copied weights' model digest checked out.
    """
    report = verify(ledger, signer_certificate, checkpoints_dir=checkpoints, ca_certificate=ca_certificate, crl=crl)
    if not report.ok:
        raise ReleaseError(f"{ledger}: lineage does not verify: {report.error}")
    entry = find_round(ledger, server_round, run_id)
    approvals = approvals_of(ledger, entry)
    if not approvals and not allow_unapproved:
        raise ReleaseError(
            f"run {entry.run_id} round {server_round} is not approved; "
            "approve it with `fedgen model approve` or pass --allow-unapproved"
        )
    checkpoint = checkpoints / entry.record.body.model_out.checkpoint
    if not checkpoint.is_file():
        raise ReleaseError(f"checkpoint {checkpoint} not found")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReleaseError(f"{out}: not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"
    staging.mkdir()
    try:
        release = _HFRelease(fmt, base, trust_remote_code) if _is_hf(entry) else None
        _write_release(staging, checkpoint, entry, approvals, privacy_spend(ledger, entry), report.head_hash, release)
        os.replace(staging, out)  # over a missing or empty folder
        atomic.fsync_directory(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


@dataclass(frozen=True)
class _HFRelease:
    fmt: str
    base: Path | None
    trust_remote_code: bool


def _is_hf(entry: RoundEntry) -> bool:
    return entry.run_started.body.architecture.get("kind") == "hf"


def _write_release(
    folder: Path,
    checkpoint: Path,
    entry: RoundEntry,
    approvals: list[Record[ModelApproved]],
    spend: dict[str, dict[str, float]],
    head_hash: str | None,
    release: _HFRelease | None,
) -> None:
    model_out, started = entry.record.body.model_out, entry.run_started.body
    copied = folder / ("round.safetensors" if release else "model.safetensors")
    with atomic.replacing(copied) as temporary:
        shutil.copyfile(checkpoint, temporary)
    try:
        copied_digest = model_file_digest(copied)
        arrays, metadata = read_model_file(copied)
    except ValueError as exc:
        raise ReleaseError(str(exc)) from None
    if copied_digest != model_out.digest:
        raise ReleaseError(
            f"{checkpoint} changed while it was exported: its model digest is now "
            f"{copied_digest[:16]}…, not {model_out.digest[:16]}… as the ledger commits"
        )
    model_config = json.loads(metadata.get("model_config", "null"))
    if model_config != started.architecture:
        raise ReleaseError(f"{checkpoint}: its model config is not the one run {entry.run_id} started with")
    config = {
        "model_config": model_config,
        "tokenizer": started.training.tokenizer,
        "labels": started.labels,
        "model_digest": model_out.digest,
        "run_id": entry.run_id,
        "round": entry.round,
        "lineage_head": head_hash,
    }
    if release is not None:
        copied.unlink()  # the round's tensors go out in the format asked for
        _write_hf_model(folder, HFModelConfig(**model_config), arrays, started.labels, release)
        config["format"] = release.fmt
    atomic.write_text(folder / (RELEASE_FILE if release else "config.json"), json.dumps(config, indent=2))
    atomic.write_text(folder / "MODEL_CARD.md", model_card(entry, approvals, spend, head_hash, release))


def _write_hf_model(folder: Path, config: HFModelConfig, arrays: dict, labels: list[str], release: _HFRelease) -> None:
    from .hf.release import write_hf_release
    from .model_source import LocalBase

    if release.base is None:
        raise ReleaseError(
            f"this run fine-tuned a Hugging Face base ({config.architecture}, digest {config.base_digest[:16]}…): "
            "name your copy of it with --base"
        )
    write_hf_release(folder, config, LocalBase(release.base, release.trust_remote_code), arrays, labels, release.fmt)


def model_card(
    entry: RoundEntry,
    approvals: list[Record[ModelApproved]],
    spend: dict[str, dict[str, float]],
    head_hash: str | None,
    release: _HFRelease | None = None,
) -> str:
    body, started = entry.record.body, entry.run_started.body
    model_lines = (
        _base_lines(started.architecture, release.fmt, started.labels)
        if release is not None
        else [_builtin_line(started)]
    )
    lines = [
        f"# Model card: run {entry.run_id}, round {entry.round}",
        "",
        f"- Model digest (SHA-256 of the named tensors and the checkpoint metadata): `{body.model_out.digest}`",
        f"- Lineage head hash at export: `{head_hash}`",
        f"- Round record hash: `{entry.record.hash}`",
        *model_lines,
        f"- Strategy: {started.strategy.name}, {started.training.rounds} rounds planned",
        "- Software: " + ", ".join(f"{k} {v}" for k, v in started.versions.items()),
        f"- Held-out accuracy at this round: {body.metrics.get('accuracy')}",
        "",
        "## Approval",
        "",
    ]
    if approvals:
        lines += [f"- Approved by {a.body.by} at {a.time}: {a.body.reason}" for a in approvals]
    else:
        lines.append("- **NOT APPROVED**: exported with --allow-unapproved; do not use in production.")
    lines += [
        "",
        "## Privacy spent per site (sample-level DP, the site's own accountant)",
        "",
        "| site | ε | δ |",
        "|---|---|---|",
    ]
    lines += [f"| {site} | {s['epsilon']:.4f} | {s['delta']:g} |" for site, s in sorted(spend.items())]
    if not spend:
        lines.append("| (no site trained under DP) | | |")
    return "\n".join(lines) + "\n"


def _builtin_line(started: RunStarted) -> str:
    return f"- Model: {started.training.model} ({started.training.tokenizer}), labels {started.labels}"


def _base_lines(base: dict, fmt: str, labels: list[str]) -> list[str]:
    """The model card's lines on a Hugging Face base and what was fine-tuned of it."""
    tuned = f"- Fine-tuning: {base['finetune']}"
    if base["finetune"] != "full":
        tuned += f" (rank {base['lora_rank']} on {', '.join(base['target_modules'])})"
    lines = [
        f"- Base model: {base['architecture']}, digest `{base['base_digest']}` "
        f"({base['total_parameters']:,} parameters; the base never left any site)",
        f"{tuned}, {base['trainable_parameters']:,} trainable parameters; exported as {fmt}",
        f"- Labels: {labels}",
    ]
    if base.get("code_digest"):
        lines.append(f"- Modeling code shipped with the base: digest `{base['code_digest']}`")
    return lines
