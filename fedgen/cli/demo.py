"""`fedgen demo`: a whole consortium on one machine, as real processes over mutual TLS.

A throwaway consortium CA issues the aggregator's and each site's certificates; the
aggregator (`fedgen aggregator start`) and every site (`fedgen site start`) run as
separate processes on loopback, each site with its own share of the bundled data; the
coordinator submits a DP run and follows it. Every process started is stopped at the
end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .. import pki
from ..config import (
    AggregatorConfig,
    AggregatorTLSConfig,
    LineageSigningConfig,
    PrivacyConfig,
    RunConfig,
    SiteTLSConfig,
    TrainingConfig,
    write_toml,
)
from ..data import bundled_data_dir, load_bundled
from ..errors import InputError
from ..model_source import checkpoint_folder
from ..partition import partition
from ..processes import ProcessGroup, free_port, sigterm_as_interrupt, wait_for_port
from ..results import RoundResult, RunResult
from ..simulation import write_sites


def loopback_aggregator(layout: pki.ConsortiumLayout, state_dir: Path) -> AggregatorConfig:
    """An aggregator on free loopback ports with the consortium's certificates in ``layout``."""
    return AggregatorConfig(
        state_dir=state_dir,
        fleet_host="127.0.0.1",
        fleet_port=free_port(),
        control_port=free_port(),
        tls=AggregatorTLSConfig(
            certificate=layout.aggregator_cert,
            private_key=layout.aggregator_key,
            ca_certificate=layout.ca_cert,
            crl=layout.crl,
        ),
        lineage=LineageSigningConfig(certificate=layout.lineage_cert, private_key=layout.lineage_key),
    )


def write_consortium(
    out: Path, *, sites: int, rounds: int, epsilon: float, seed: int, training: TrainingConfig | None = None
) -> tuple[Path, list[Path], Path]:
    """Certificates, data shares and configs of a loopback consortium; (aggregator, sites, run) tomls.

    ``training`` (default: the defaults) names the model; a checkpoint folder is every
    site's base too (on one machine they share it; in a consortium each holds its copy).
    """
    training = (training or TrainingConfig()).model_copy(update={"rounds": rounds, "seed": seed})
    base_model = checkpoint_folder(training.model)
    certs = out / "certs"
    pki.init_consortium(certs, "fedgen-demo", days=8)  # outlives the 7-day certificates it issues
    pki.issue_aggregator(certs, ["127.0.0.1", "localhost"], days=7)
    pki.issue_lineage(certs, days=7)
    layout = pki.layout(certs)
    (out / "aggregator").mkdir()
    aggregator_toml = out / "aggregator" / "aggregator.toml"
    aggregator = loopback_aggregator(layout, out / "aggregator" / "state")
    fleet_port = aggregator.fleet_port
    write_toml(aggregator, aggregator_toml)

    def deployment(index: int) -> dict:
        site_id = f"site-{index}"
        pki.issue_site(certs, site_id, days=7)
        return {
            **({"base_model": base_model, "trust_remote_code": training.trust_remote_code} if base_model else {}),
            "aggregator": f"127.0.0.1:{fleet_port}",
            "runtime_port": free_port(),
            "tls": SiteTLSConfig(
                certificate=layout.site_cert(site_id),
                private_key=layout.site_key(site_id),
                ca_certificate=layout.ca_cert,
            ),
        }

    train = load_bundled("train")
    shares = partition(train.labels, sites, "dirichlet", seed, alpha=1.0)
    site_tomls = write_sites(train, shares, out / "sites", PrivacyConfig(epsilon=epsilon), "cpu", deployment)
    run = RunConfig(
        aggregator=aggregator_toml,
        sites=sites,
        labels=list(train.label_names),
        max_length=max(len(s) for s in train.sequences),
        eval_data=bundled_data_dir() / "test.csv",
        training=training.model_copy(update={"model": str(base_model)}) if base_model else training,
    )
    run_toml = write_toml(run, out / "run.toml")
    return aggregator_toml, site_tomls, run_toml


def run_demo(
    *,
    sites: int = 3,
    rounds: int = 3,
    epsilon: float = 8.0,
    seed: int = 0,
    out: Path | None = None,
    training: TrainingConfig | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> RunResult:
    """Start a loopback consortium, run ``rounds`` DP rounds, stop everything, return the result.

    ``training`` chooses the model and its fine-tuning (`TrainingConfig`); rounds and seed
    come from the arguments.
    """
    from fedgen.config import load_toml
    from fedgen.server.coordinator import follow, submit

    say = on_event or (lambda message: None)
    if out is not None and out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: folder is not empty; choose a new --out or remove the old demo")
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="fedgen-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    aggregator_toml, site_tomls, run_toml = write_consortium(
        out, sites=sites, rounds=rounds, epsilon=epsilon, seed=seed, training=training
    )
    aggregator = load_toml(aggregator_toml, AggregatorConfig)
    (out / "logs").mkdir()
    group = ProcessGroup(out / "logs")
    fedgen = [sys.executable, "-m", "fedgen.cli"]
    with sigterm_as_interrupt():
        try:
            process, log = group.start("aggregator", [*fedgen, "aggregator", "start", "--config", str(aggregator_toml)])
            wait_for_port(aggregator.fleet_port, process, log)
            wait_for_port(aggregator.control_port, process, log)
            say(f"aggregator up: Fleet API 127.0.0.1:{aggregator.fleet_port} (mutual TLS)")
            for site_toml in site_tomls:
                group.start(site_toml.parent.name, [*fedgen, "site", "start", "--config", str(site_toml)])
            say(f"{len(site_tomls)} sites started, each with its own certificate and data")
            submitted = submit(load_toml(run_toml, RunConfig), str(run_toml))
            say(f"run {submitted.run_id} submitted; its records go to {submitted.run_dir}")
            return follow(submitted, on_round, check=group.check_alive)
        finally:
            group.stop()
            say(f"all processes stopped; logs in {out / 'logs'}")
