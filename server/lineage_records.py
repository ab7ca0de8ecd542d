"""What the aggregator writes into the lineage ledger for a run and each of its rounds."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import platform
from pathlib import Path
from typing import Any

import flwr
import opacus
import torch

import fedgen
from fedgen.strategies.recorder import RoundLog, SiteOutcome


def software_versions() -> dict[str, str]:
    return {"fedgen": fedgen.__version__, "flwr": flwr.__version__, "torch": torch.__version__,
            "opacus": opacus.__version__, "python": platform.python_version()}


def code_digest() -> str:
    """SHA-256 over the source of the fedgen that runs (every .py file, by relative path)."""
    h = hashlib.sha256()
    for package in ("fedgen", "fedgen.client", "fedgen.server", "fedgen.strategies"):
        # Found, not imported: the server never imports the client.
        root = Path(importlib.util.find_spec(package).origin).parent
        for path in sorted(root.glob("*.py")):
            h.update(f"{package}/{path.name}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def finite(value: float | None) -> float | None:
    """JSON has no NaN: a metric that could not be computed is recorded as null."""
    return None if value is None or not math.isfinite(value) else float(value)


def contribution(outcome: SiteOutcome) -> dict[str, Any]:
    report = outcome.report
    assert report is not None
    return {
        "site": outcome.site, "fingerprint": outcome.fingerprint, "update_digest": outcome.update_digest,
        "signature": outcome.signature, "certificate": outcome.certificate,
        "examples": report.num_examples, "steps": report.steps, "train_loss": finite(report.train_loss),
        "dp": report.dp, "noise_multiplier": report.noise_multiplier, "sample_rate": report.sample_rate,
        "max_grad_norm": report.max_grad_norm, "epsilon": report.epsilon, "delta": report.delta,
    }


def left_out_records(log: RoundLog | None) -> list[tuple[str, dict]]:
    """A record for each update the round rejected and each site that refused it."""
    records: list[tuple[str, dict]] = []
    for o in log.outcomes if log is not None else []:
        if o.rejected is not None:
            records.append(("update_rejected", {"round": log.server_round, "site": o.site,
                                                "update_digest": o.update_digest, "reason": o.rejected}))
        elif o.refused is not None:
            records.append(("site_refused", {"round": log.server_round, "site": o.site, "reason": o.refused}))
    return records


def round_records(log: RoundLog | None, *, server_round: int, model_in: str, model_out: str,
                  checkpoint: Path, strategy: dict, metrics: dict[str, float]) -> list[tuple[str, dict]]:
    """The records of one committed round: each rejected update, each refusal, then the commit."""
    outcomes = log.outcomes if log is not None else []
    records = left_out_records(log)
    head = log.head if log is not None else None
    records.append(("round_committed", {
        "round": server_round,
        "started_at": log.started_at if log is not None else None,
        "ledger_head": {"seq": head.seq, "hash": head.hash} if head is not None else None,
        "model_in": {"digest": model_in},
        "model_out": {"digest": model_out, "checkpoint": checkpoint.name},
        "strategy": strategy,
        "contributions": [contribution(o) for o in outcomes if o.contributed],
        "rejected": [{"site": o.site, "reason": o.rejected} for o in outcomes if o.rejected is not None],
        "refused": [{"site": o.site, "reason": o.refused} for o in outcomes if o.refused is not None],
        "failed": [{"site": o.site, "reason": o.failed} for o in outcomes if o.failed is not None],
        "metrics": {name: finite(value) for name, value in metrics.items()},
    }))
    return records
