"""The `fedgen` command line."""

from __future__ import annotations

import contextlib
import json
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..config import STRATEGY_NAMES, AggregatorConfig, RunConfig, SiteConfig, TrainingConfig, load_toml
from ..model import PRESETS
from ..results import RoundResult, RunResult
from .certs import certs_app
from .lineage import lineage_app, model_app
from .output import ReportingGroup, err, fail, log_to_stderr, warn

app = typer.Typer(
    cls=ReportingGroup,
    help="Sovereign federated fine-tuning of genomic language models.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(certs_app, name="certs")
app.add_typer(lineage_app, name="lineage")
app.add_typer(model_app, name="model")

DEFAULTS = TrainingConfig()
Strategy = Enum("Strategy", {name: name for name in STRATEGY_NAMES}, type=str)
Finetune = Enum("Finetune", {name: name for name in ("auto", "full", "lora", "ffa-lora")}, type=str)

MODEL_OPTION = typer.Option(
    DEFAULTS.model,
    "--model",
    help=f"A built-in preset ({', '.join(PRESETS)}) or a local Hugging Face model folder (loaded offline).",
)
FINETUNE_OPTION = typer.Option(
    DEFAULTS.finetune, "--finetune", help="What trains and travels: auto = full for presets, lora for a checkpoint."
)
LORA_RANK_OPTION = typer.Option(DEFAULTS.lora_rank, "--lora-rank", min=1, help="LoRA adapter rank.")
LORA_ALPHA_OPTION = typer.Option(DEFAULTS.lora_alpha, "--lora-alpha", min=0.0, help="LoRA scaling alpha.")
LORA_TARGETS_OPTION = typer.Option(
    None, "--lora-target", help="Module LoRA wraps (repeatable; default: the architecture's attention query, value)."
)
TRUST_CODE_OPTION = typer.Option(
    False, "--trust-remote-code", help="Run modeling code shipped inside the checkpoint folder (explicit opt-in)."
)
LOCAL_EPOCHS_OPTION = typer.Option(DEFAULTS.local_epochs, "--local-epochs", min=0.0, help="Local epochs per round.")


class Partition(str, Enum):
    iid = "iid"
    label_skew = "label-skew"
    dirichlet = "dirichlet"


def _round_line(result: RoundResult) -> str:
    trained = [s for s in result.sites if s.status == "trained"]
    others = [f"{s.site} {s.status} ({s.reason})" for s in result.sites if s.status != "trained"]
    eps = ", ".join(f"{site} {value:.2f}" for site, value in sorted(result.epsilon.items()))
    parts = [
        f"round {result.round}: accuracy {result.accuracy:.4f}  loss {result.loss:.4f}",
        f"sites {len(trained)}/{len(result.sites)}",
    ]
    if eps:
        parts.append(f"ε {eps}")
    if others:
        parts.append("; ".join(others))
    return "  |  ".join(parts)


def _result_table(result: RunResult, title: str) -> Table:
    sites = sorted({s.site for r in result.rounds for s in r.sites})
    table = Table(title=title, show_lines=False)
    table.add_column("round", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("loss", justify="right")
    for site in sites:
        table.add_column(f"ε {site}", justify="right")
    for r in result.rounds:
        by_site = {s.site: s for s in r.sites}
        cells = []
        for site in sites:
            row = by_site.get(site)
            if row is None:
                cells.append("-")
            elif row.status != "trained":
                cells.append(row.status)
            else:
                cells.append("no DP" if row.epsilon is None else f"{row.epsilon:.3f}")
        table.add_row(str(r.round), f"{r.accuracy:.4f}", f"{r.loss:.4f}", *cells)
    return table


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from .. import __version__

        print(__version__)
        raise typer.Exit()


@app.command()
def simulate(
    data: Path = typer.Option(
        None, "--data", help="CSV/TSV, FASTA or Genomic Benchmarks folder (default: the bundled promoter set)."
    ),
    sites: int = typer.Option(3, "--sites", min=1, help="Number of simulated sites."),
    rounds: int = typer.Option(DEFAULTS.rounds, "--rounds", min=1, help="Federated rounds."),
    strategy: Strategy = typer.Option(DEFAULTS.strategy, "--strategy", help="Aggregation strategy."),
    partition: Partition = typer.Option(
        Partition.dirichlet, "--partition", help="How training data is split across sites."
    ),
    alpha: float = typer.Option(1.0, "--alpha", min=0.0, help="Dirichlet concentration (lower = more skew)."),
    epsilon: float = typer.Option(8.0, "--epsilon", min=0.0, help="Each site's ε ceiling (δ=1e-5)."),
    no_dp: bool = typer.Option(False, "--no-dp", help="Train without differential privacy (baseline)."),
    noise_multiplier: float = typer.Option(
        None, "--noise-multiplier", min=0.0, help="Fixed DP noise multiplier instead of calibrating to ε."
    ),
    model: str = MODEL_OPTION,
    finetune: Finetune = FINETUNE_OPTION,
    lora_rank: int = LORA_RANK_OPTION,
    lora_alpha: float = LORA_ALPHA_OPTION,
    lora_target: list[str] = LORA_TARGETS_OPTION,
    trust_remote_code: bool = TRUST_CODE_OPTION,
    tokenizer: str = typer.Option(
        DEFAULTS.tokenizer, "--tokenizer", help="nucleotide, kmerK (non-overlapping) or kmerKsS (stride S)."
    ),
    local_epochs: float = LOCAL_EPOCHS_OPTION,
    batch_size: int = typer.Option(DEFAULTS.batch_size, "--batch-size", min=1, help="Expected local batch size."),
    lr: float = typer.Option(DEFAULTS.learning_rate, "--lr", min=0.0, help="Local learning rate."),
    seed: int = typer.Option(DEFAULTS.seed, "--seed", help="Seed for split, partition, init and training."),
    out: Path = typer.Option(
        None, "--out", help="Where site folders, checkpoints and result.json go (default: a new temporary folder)."
    ),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N for every site."),
    adversary: list[str] = typer.Option(
        None, "--adversary", help="SITE:ATTACK, a site that poisons its updates (sign-flip or scale); repeatable."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary object on stdout."),
) -> None:
    """Fine-tune across simulated sites on this machine (Flower + Ray)."""
    from ..simulation import simulate as run

    adversaries = {}
    for item in adversary or []:
        site, _, attack = item.partition(":")
        if not attack:
            fail(f"--adversary {item!r}: expected SITE:ATTACK, e.g. site-0:sign-flip")
        adversaries[site] = attack
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for --json alone
        result = run(
            data,
            sites=sites,
            rounds=rounds,
            strategy=strategy.value,
            partition_scheme=partition.value,
            alpha=alpha,
            epsilon=None if no_dp else epsilon,
            noise_multiplier=noise_multiplier,
            model=model,
            tokenizer=tokenizer,
            finetune=finetune.value,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_target_modules=lora_target,
            trust_remote_code=trust_remote_code,
            local_epochs=local_epochs,
            batch_size=batch_size,
            learning_rate=lr,
            seed=seed,
            out=out,
            device=device,
            adversaries=adversaries,
            on_round=_report_round,
        )
    _print_result(result, as_json, "fedgen simulation")


aggregator_app = typer.Typer(
    cls=ReportingGroup, no_args_is_help=True, help="The consortium's aggregator (Flower SuperLink behind mutual TLS)."
)
site_app = typer.Typer(
    cls=ReportingGroup, help="A site: join a federation, inspect its privacy budget.", no_args_is_help=True
)
app.add_typer(aggregator_app, name="aggregator")
app.add_typer(site_app, name="site")
CONFIG_OPTION = typer.Option(..., "--config", "-c", help="TOML configuration file.")


@aggregator_app.command("start")
def aggregator_start(config: Path = CONFIG_OPTION) -> None:
    """Start the aggregator: Fleet API public with mutual TLS, Control/Runtime on loopback."""
    from ..server.aggregator import check_aggregator, crl_warning, start_aggregator

    settings = load_toml(config, AggregatorConfig)
    tls = check_aggregator(settings, str(config))
    if (warning := crl_warning(tls)) is not None:
        warn(warning)
    err.print(
        f"aggregator: Fleet API on {settings.fleet_host}:{settings.fleet_port} (mutual TLS), "
        f"Control API on 127.0.0.1:{settings.control_port}; state in {settings.state_dir}",
        highlight=False,
        soft_wrap=True,
    )
    log_to_stderr()
    start_aggregator(settings, str(config))


@site_app.command("start")
def site_start(config: Path = CONFIG_OPTION) -> None:
    """Join the federation: run this site's SuperNode with its consortium certificate."""
    from ..client.supernode import start_site

    log_to_stderr()
    start_site(config)


@site_app.command("budget")
def site_budget(
    config: Path = CONFIG_OPTION, as_json: bool = typer.Option(False, "--json", help="Print JSON.")
) -> None:
    """Show the ε this site has spent, from its privacy ledger."""
    from ..client.ledger import PrivacyLedger

    site = load_toml(config, SiteConfig)
    p = site.privacy
    ledger = PrivacyLedger.open(site.state_dir, accountant=p.accountant, delta=p.delta)
    spent = ledger.epsilon
    summary = {
        "site": site.site_id,
        "epsilon_spent": spent,
        "epsilon_ceiling": p.epsilon,
        "delta": p.delta,
        "accountant": p.accountant,
        "rounds": ledger.rounds,
    }
    if as_json:
        print(json.dumps(summary))
        return
    console = Console()
    console.print(
        f"site {site.site_id}: ε spent {spent:.4f} of {p.epsilon:g} (δ={p.delta:g}, "
        f"{p.accountant}), {max(p.epsilon - spent, 0):.4f} left",
        highlight=False,
    )
    table = Table("run", "round", "steps", "σ", "q", "ε after", "time")
    for r in ledger.rounds:
        table.add_row(
            str(r["run_id"]),
            str(r["round"]),
            str(r["steps"]),
            f"{r['noise_multiplier']:.4f}",
            f"{r['sample_rate']:.4f}",
            f"{r['epsilon_after']:.4f}",
            r["time"],
        )
    console.print(table)


def _print_result(result: RunResult, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(result.summary()))
        return
    console = Console()
    console.print(_result_table(result, title))
    where = [f"result.json in {result.out_dir}"]
    if result.checkpoints:
        where.append(f"checkpoints in {result.checkpoints[0].parent}")
    if result.lineage:
        where.append(f"lineage in {result.lineage}")
    console.print(f"final accuracy {result.final_accuracy:.4f}; " + "; ".join(where), highlight=False, soft_wrap=True)


def _report_round(result: RoundResult) -> None:
    err.print(_round_line(result), highlight=False, soft_wrap=True)


@app.command("run")
def run_command(
    config: Path = CONFIG_OPTION,
    resume: bool = typer.Option(
        False, "--resume", help="Continue the last, interrupted run after its last committed round (same run.toml)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary object on stdout."),
) -> None:
    """Submit a run to the aggregator (on its host) and follow it round by round."""
    from ..server.coordinator import follow, submit

    submitted = submit(load_toml(config, RunConfig), str(config), resume=resume)
    err.print(
        f"run {submitted.run_id} submitted; following it (records in {submitted.run_dir})",
        highlight=False,
        soft_wrap=True,
    )
    result = follow(submitted, _report_round)
    _print_result(result, as_json, f"fedgen run {submitted.run_id}")


@app.command()
def demo(
    sites: int = typer.Option(3, "--sites", min=1, help="Sites to start, each its own process."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Federated rounds."),
    epsilon: float = typer.Option(8.0, "--epsilon", min=0.0, help="Each site's ε ceiling (δ=1e-5)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the data split and training."),
    local_epochs: float = LOCAL_EPOCHS_OPTION,
    out: Path = typer.Option(
        None, "--out", help="Where certificates, configs, logs and checkpoints go (default: a new temporary folder)."
    ),
    model: str = MODEL_OPTION,
    finetune: Finetune = FINETUNE_OPTION,
    lora_rank: int = LORA_RANK_OPTION,
    lora_alpha: float = LORA_ALPHA_OPTION,
    lora_target: list[str] = LORA_TARGETS_OPTION,
    trust_remote_code: bool = TRUST_CODE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary object on stdout."),
) -> None:
    """A consortium on this machine: CA, aggregator and sites as real processes over mutual TLS."""
    from .demo import run_demo

    try:
        training = TrainingConfig(
            model=model,
            finetune=finetune.value,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_target_modules=list(lora_target or []),
            trust_remote_code=trust_remote_code,
            local_epochs=local_epochs,
        )
    except ValueError as exc:
        fail(str(exc))

    with contextlib.redirect_stdout(sys.stderr):
        result = run_demo(
            sites=sites,
            rounds=rounds,
            epsilon=epsilon,
            seed=seed,
            out=out,
            training=training,
            on_round=_report_round,
            on_event=lambda m: err.print(m, highlight=False, soft_wrap=True),
        )
    _print_result(result, as_json, "fedgen demo")


def main() -> None:
    app()
