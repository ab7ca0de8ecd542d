"""Simulation: many virtual sites on one machine, on Flower's Ray-based engine.

Each virtual site is set up as a real one would be: its own folder with its share of
the data, a ``site.toml`` and a state directory holding its privacy ledger. The
ServerApp runs in the caller's process, so rounds are reported as they commit.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import RecordDict

from . import pki
from .config import LineageSigningConfig, PrivacyConfig, SiteConfig, TrainingConfig, load_toml, write_toml
from .data import SequenceDataset, bundled_data_dir, load_bundled, load_dataset, train_test_split
from .errors import FedgenError, InputError, OperationFailed
from .model_config import AnyModelConfig
from .model_source import checkpoint_folder, resolve_model_config
from .params import arrays_to_record, digest, record_to_arrays
from .partition import SCHEMES, partition
from .protocol import ARRAYS_KEY, SITE_KEY
from .results import RoundResult, RunResult
from .sovereignty import apply_sovereign_environment, ray_without_api_server
from .state_files import LINEAGE_FILE, RESULT_FILE

DEFAULTS = TrainingConfig()
TEST_FRACTION = 0.15


def split_for_simulation(data: str | Path | None, seed: int) -> tuple[SequenceDataset, SequenceDataset]:
    """Train and held-out sets: bundled split, Genomic Benchmarks' own, or a seeded split."""
    if data is None:
        return load_bundled("train"), load_bundled("test")
    path = Path(data)
    if path.is_dir() and (path / "train").is_dir() and (path / "test").is_dir():
        return load_dataset(path, split="train"), load_dataset(path, split="test")
    return train_test_split(load_dataset(path), TEST_FRACTION, seed)


def write_sites(
    train: SequenceDataset,
    shares: list,
    root: Path,
    privacy: PrivacyConfig,
    device: str,
    extra: Callable[[int], dict] | None = None,
) -> list[Path]:
    """Give each site its folder: data.csv, site.toml, state/. Return the site.toml paths.

    ``extra(index)`` adds fields to a site's config (a deployment's address and certificates).
    """
    configs = []
    for index, share in enumerate(shares):
        site_dir = root / f"site-{index}"
        site_dir.mkdir(parents=True, exist_ok=True)
        with open(site_dir / "data.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sequence", "label"])
            for i in share:
                writer.writerow([train.sequences[i], train.label_names[train.labels[i]]])
        site = SiteConfig(
            site_id=f"site-{index}",
            data=site_dir / "data.csv",
            state_dir=site_dir / "state",
            device=device,
            privacy=privacy,
            **(extra(index) if extra else {}),
        )
        configs.append(write_toml(site, site_dir / "site.toml"))
    return configs


class SimulationFailed(OperationFailed, RuntimeError):
    """The simulation started from good input and failed on the way (e.g. a round without quorum)."""


def simulate(
    data: str | Path | None = None,
    *,
    sites: int = 3,
    rounds: int = DEFAULTS.rounds,
    strategy: str = DEFAULTS.strategy,
    strategy_options: dict[str, float] | None = None,
    partition_scheme: str = "dirichlet",
    alpha: float = 1.0,
    epsilon: float | None = PrivacyConfig().epsilon,
    delta: float = PrivacyConfig().delta,
    noise_multiplier: float | None = None,
    max_grad_norm: float = PrivacyConfig().max_grad_norm,
    model: str = DEFAULTS.model,
    tokenizer: str = DEFAULTS.tokenizer,
    finetune: str = DEFAULTS.finetune,
    lora_rank: int = DEFAULTS.lora_rank,
    lora_alpha: float = DEFAULTS.lora_alpha,
    lora_target_modules: list[str] | None = None,
    trust_remote_code: bool = False,
    local_epochs: float = DEFAULTS.local_epochs,
    batch_size: int = DEFAULTS.batch_size,
    learning_rate: float = DEFAULTS.learning_rate,
    seed: int = DEFAULTS.seed,
    out: str | Path | None = None,
    device: str = "cpu",
    cpus_per_site: float = 1.0,
    adversaries: dict[str, str] | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
) -> RunResult:
    """Fine-tune a DNA language model across ``sites`` simulated sites.

    Parameters
    ----------
    data : path, optional
        CSV/TSV, FASTA or Genomic Benchmarks folder; default the bundled promoter set.
    model : str
        A built-in preset (``nano`` ... ``large``) or a local Hugging Face checkpoint folder,
        which every virtual site and the aggregator load (offline) as their base.
    finetune : {"auto", "full", "lora", "ffa-lora"}
        What trains and travels; ``auto`` is full for presets, LoRA for a checkpoint
        (``lora_rank``, ``lora_alpha``, ``lora_target_modules``: the adapters).
    trust_remote_code : bool
        Run modeling code shipped inside the checkpoint (every virtual site opts in).
    epsilon : float or None
        Each site's ε ceiling; ``None`` trains without differential privacy.
    partition_scheme : {"iid", "label-skew", "dirichlet"}
        How the training set is split across sites (``alpha`` for Dirichlet).
    out : path, optional
        Where site folders, checkpoints and ``result.json`` go (default: a new temp dir).
    adversaries : dict, optional
        ``{"site-0": "sign-flip"}``: sites that poison their updates ("sign-flip" or
        "scale"), to compare how strategies withstand them.
    on_round : callable, optional
        Called with each `RoundResult` as the round commits.

    Returns
    -------
    RunResult
        Per-round accuracy and loss, per-site ε, checkpoint paths.
    """
    if sites < 1:
        raise InputError("sites must be at least 1")
    if partition_scheme not in SCHEMES:
        raise InputError(f"unknown partition {partition_scheme!r}; choose one of {', '.join(SCHEMES)}")
    try:  # the settings, tokenizer, model preset and partition refuse unusable arguments with ValueError
        training = TrainingConfig(
            rounds=rounds,
            strategy=strategy,
            strategy_options=strategy_options or {},
            local_epochs=local_epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            model=model,
            tokenizer=tokenizer,
            finetune=finetune,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_target_modules=list(lora_target_modules or []),
            trust_remote_code=trust_remote_code,
            seed=seed,
        )
        privacy = PrivacyConfig(
            enabled=epsilon is not None,
            epsilon=epsilon or 8.0,
            delta=delta,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
        )
        tamper = Adversaries(adversaries) if adversaries else None
        unknown = sorted(set(adversaries or {}) - {f"site-{i}" for i in range(sites)})
        if unknown:
            raise InputError(f"adversaries {unknown} are not among site-0 .. site-{sites - 1}")
        train, test = split_for_simulation(data, seed)
        shares = partition(train.labels, sites, partition_scheme, seed, alpha=alpha)
        longest = max(len(s) for s in (*train.sequences, *test.sequences))
        base_model = checkpoint_folder(model)
        model_config = resolve_model_config(model, training, num_labels=len(train.label_names), max_bases=longest)
    except FedgenError:
        raise
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if out is not None and Path(out).exists() and any(Path(out).iterdir()):
        # Its sites' privacy ledgers and checkpoints belong to another run: never mix them.
        raise InputError(f"{out}: folder is not empty; choose a new --out or remove the old run")
    apply_sovereign_environment()  # refuses in a process where Flower or Ray would phone home
    # Only now that every input checked out does anything get written.
    # Absolute: Ray's workers load the site configs, and result.json names files, from anywhere.
    out_dir = Path(os.path.abspath(out)) if out is not None else Path(tempfile.mkdtemp(prefix="fedgen-sim-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    site_base = {"base_model": base_model, "trust_remote_code": trust_remote_code} if base_model else {}
    site_tomls = write_sites(train, shares, out_dir / "sites", privacy, device, extra=lambda _: site_base)
    config_summary = {
        "data": os.path.abspath(data) if data is not None else str(bundled_data_dir()),
        "sites": sites,
        "partition": partition_scheme,
        "alpha": alpha,
        "site_examples": [len(share) for share in shares],
        "test_examples": len(test),
        "privacy": privacy.model_dump(),
        "training": training.model_dump(),
        "adversaries": dict(adversaries or {}),
    }
    result = _run(
        training,
        model_config,
        base_model,
        train.label_names,
        site_tomls,
        test,
        out_dir,
        config_summary,
        cpus_per_site,
        device,
        tamper,
        on_round,
    )
    result.save(out_dir / RESULT_FILE)
    return result


def _run(
    training: TrainingConfig,
    model_config: AnyModelConfig,
    base_model: Path | None,
    label_names: tuple[str, ...],
    site_tomls: list[Path],
    test: SequenceDataset,
    out_dir: Path,
    config_summary: dict,
    cpus_per_site: float,
    device: str,
    tamper: Adversaries | None,
    on_round: Callable[[RoundResult], None] | None,
) -> RunResult:
    # Imported here: fedgen's core does not depend on the client and server packages.
    from flwr.simulation import run_simulation

    from fedgen.client.app import make_client_app
    from fedgen.server.app import make_server_app
    from fedgen.server.plan import LineagePlan, RunPlan

    ledger, key, certificate = simulation_signer(out_dir)
    plan = RunPlan(
        training=training,
        model=model_config,
        base_model=base_model,
        label_names=list(label_names),
        num_sites=len(site_tomls),
        out_dir=out_dir,
        config_summary=config_summary,
        lineage=LineagePlan(ledger=ledger, signing=LineageSigningConfig(certificate=certificate, private_key=key)),
    )
    server_app, outcome = make_server_app(plan, test, on_round)
    client_app = make_client_app(_SimulatedSites([str(p) for p in site_tomls]), tamper)
    # Flower logs every message exchange at INFO; rounds are reported through on_round.
    logging.getLogger("flwr").setLevel(logging.ERROR)
    # Ray hides GPUs from actors that reserve none; sites that train on a GPU share it.
    gpus_per_site = 0.0 if device == "cpu" or not torch.cuda.is_available() else 1.0 / len(site_tomls)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    with ray_without_api_server():  # it would probe cloud metadata services
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(site_tomls),
            backend_config={
                "client_resources": {"num_cpus": cpus_per_site, "num_gpus": gpus_per_site},
                "init_args": {"include_dashboard": False, "log_to_driver": False},
            },
        )
    if outcome.error is not None:
        raise SimulationFailed(f"simulation failed: {outcome.error}") from outcome.error
    if outcome.result is None:
        raise SimulationFailed("simulation ended without a result; see the log above")
    return outcome.result


def simulation_signer(out_dir: Path) -> tuple[Path, Path, Path]:
    """(ledger, key, certificate): a simulation's lineage is signed like a deployment's,
    by a lineage-signing certificate of a throwaway CA kept in ``out_dir/pki``."""
    folder = out_dir / "pki"
    pki.init_consortium(folder, "fedgen-simulation", days=31)  # outlives the lineage certificate
    pki.issue_lineage(folder, days=30)
    layout = pki.layout(folder)
    return out_dir / LINEAGE_FILE, layout.lineage_key, layout.lineage_cert


ATTACKS = ("sign-flip", "scale")
ATTACK_FACTOR = 10.0


class Adversaries:
    """Simulated sites that poison their update (picklable for Ray's workers).

    ``sign-flip`` sends global - 10 x (local - global); ``scale`` sends global + 10 x
    (local - global). The digest is recomputed, as a real attacker would, so only the
    aggregation strategy stands between the poison and the global model.
    """

    def __init__(self, attacks: dict[str, str]) -> None:
        for site, kind in attacks.items():
            if kind not in ATTACKS:
                raise ValueError(f"adversary {site}: unknown attack {kind!r}; choose one of {', '.join(ATTACKS)}")
        self.attacks = dict(attacks)

    def __call__(self, site: SiteConfig, sent: RecordDict, reply: RecordDict) -> RecordDict:
        kind = self.attacks.get(site.site_id)
        if kind is None:
            return reply
        start, honest = record_to_arrays(sent[ARRAYS_KEY]), record_to_arrays(reply[ARRAYS_KEY])
        factor = -ATTACK_FACTOR if kind == "sign-flip" else ATTACK_FACTOR
        poisoned = {
            name: (start[name] + factor * (honest[name] - start[name])).astype(honest[name].dtype) for name in honest
        }
        reply[ARRAYS_KEY] = arrays_to_record(poisoned)
        reply[SITE_KEY]["update-digest"] = digest(poisoned)
        return reply


class _SimulatedSites:
    """Maps a virtual SuperNode (by partition id) to its site.toml; picklable for Ray."""

    def __init__(self, site_tomls: list[str]) -> None:
        self.site_tomls = site_tomls

    def __call__(self, context) -> SiteConfig:
        return load_toml(self.site_tomls[int(context.node_config["partition-id"])], SiteConfig)
