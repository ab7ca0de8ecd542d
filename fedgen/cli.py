"""The `fedgen` command line."""

from __future__ import annotations

import contextlib
import json
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cli_certs import certs_app
from .config import STRATEGY_NAMES, ConfigError, TrainingConfig
from .data import DataError
from .model import PRESETS
from .results import RoundResult, RunResult

app = typer.Typer(help="Sovereign federated fine-tuning of genomic language models.",
                  no_args_is_help=True, add_completion=False)
app.add_typer(certs_app, name="certs")
err = Console(stderr=True)

DEFAULTS = TrainingConfig()
Strategy = Enum("Strategy", {name: name for name in STRATEGY_NAMES}, type=str)
Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)


class Partition(str, Enum):
    iid = "iid"
    label_skew = "label-skew"
    dirichlet = "dirichlet"


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _round_line(result: RoundResult) -> str:
    trained = [s for s in result.sites if s.status == "trained"]
    others = [f"{s.site} {s.status}" for s in result.sites if s.status != "trained"]
    eps = ", ".join(f"{site} {value:.2f}" for site, value in sorted(result.epsilon.items()))
    parts = [f"round {result.round}: accuracy {result.accuracy:.4f}  loss {result.loss:.4f}",
             f"sites {len(trained)}/{len(result.sites)}"]
    if eps:
        parts.append(f"ε {eps}")
    if others:
        parts.append("; ".join(others))
    return "  |  ".join(parts)


def _result_table(result: RunResult) -> Table:
    sites = sorted({s.site for r in result.rounds for s in r.sites})
    table = Table(title="fedgen simulation", show_lines=False)
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
        from . import __version__

        print(__version__)
        raise typer.Exit()


@app.command()
def simulate(
    data: Path = typer.Option(None, "--data", help="CSV/TSV, FASTA or Genomic Benchmarks folder "
                              "(default: the bundled promoter set)."),
    sites: int = typer.Option(3, "--sites", min=1, help="Number of simulated sites."),
    rounds: int = typer.Option(DEFAULTS.rounds, "--rounds", min=1, help="Federated rounds."),
    strategy: Strategy = typer.Option(DEFAULTS.strategy, "--strategy", help="Aggregation strategy."),
    partition: Partition = typer.Option(Partition.dirichlet, "--partition",
                                        help="How training data is split across sites."),
    alpha: float = typer.Option(1.0, "--alpha", min=0.0, help="Dirichlet concentration (lower = more skew)."),
    epsilon: float = typer.Option(8.0, "--epsilon", min=0.0, help="Each site's ε ceiling (δ=1e-5)."),
    no_dp: bool = typer.Option(False, "--no-dp", help="Train without differential privacy (baseline)."),
    noise_multiplier: float = typer.Option(None, "--noise-multiplier", min=0.0,
                                           help="Fixed DP noise multiplier instead of calibrating to ε."),
    model: Preset = typer.Option(DEFAULTS.model, "--model", help="Built-in model preset."),
    tokenizer: str = typer.Option(DEFAULTS.tokenizer, "--tokenizer",
                                 help="nucleotide, kmerK (non-overlapping) or kmerKsS (stride S)."),
    local_epochs: float = typer.Option(DEFAULTS.local_epochs, "--local-epochs", min=0.0, help="Local epochs per round."),
    batch_size: int = typer.Option(DEFAULTS.batch_size, "--batch-size", min=1, help="Expected local batch size."),
    lr: float = typer.Option(DEFAULTS.learning_rate, "--lr", min=0.0, help="Local learning rate."),
    seed: int = typer.Option(DEFAULTS.seed, "--seed", help="Seed for split, partition, init and training."),
    out: Path = typer.Option(None, "--out", help="Where site folders, checkpoints and result.json go "
                             "(default: a new temporary folder)."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N for every site."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary object on stdout."),
) -> None:
    """Fine-tune across simulated sites on this machine (Flower + Ray)."""
    from .simulation import simulate as run

    def report(result: RoundResult) -> None:
        err.print(_round_line(result), highlight=False, soft_wrap=True)

    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for --json alone
            result = run(
                data, sites=sites, rounds=rounds, strategy=strategy.value,
                partition_scheme=partition.value, alpha=alpha,
                epsilon=None if no_dp else epsilon, noise_multiplier=noise_multiplier,
                model=model.value, tokenizer=tokenizer, local_epochs=local_epochs,
                batch_size=batch_size, learning_rate=lr, seed=seed, out=out, device=device,
                on_round=report,
            )
    except (DataError, ConfigError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(result.summary()))
        return
    console = Console()
    console.print(_result_table(result))
    console.print(f"final accuracy {result.final_accuracy:.4f}; checkpoints and result.json in "
                  f"{result.out_dir}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
