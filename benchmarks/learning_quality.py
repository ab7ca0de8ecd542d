"""Learning quality on the bundled promoter data, measured side by side in one run.

Same model, same total epochs (rounds x local epochs) for every row:

1. centralized, no DP: all training data in one place;
2. federated, no DP: 3 simulated sites (Dirichlet split) on Flower's simulation engine;
3. federated, DP: the same, each site under a sample-level ε ceiling (δ = 1e-5);
   (sites get their shares by ``--partition``, default Dirichlet(1.0));
4. reference: logistic regression on overlapping 4-mer counts, centralized.

Accuracy is on the bundled held-out split (888 sequences; one standard error is about
1.4 points). Run: ``python benchmarks/learning_quality.py [--seeds 0 1 2] [--epsilon 8]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fedgen
from fedgen.client.trainer import LocalPlan, local_steps, train_local
from fedgen.config import TrainingConfig
from fedgen.data import SequenceDataset, load_bundled
from fedgen.model import build_model, evaluate_classifier, preset_config
from fedgen.tokenizers import make_tokenizer

CPU = torch.device("cpu")


def centralized(train: SequenceDataset, test: SequenceDataset, cfg: TrainingConfig, epochs: int) -> float:
    tokenizer = make_tokenizer(cfg.tokenizer)
    longest = max(len(s) for s in (*train.sequences, *test.sequences))
    model = build_model(
        preset_config(cfg.model, vocab_size=tokenizer.vocab_size, max_len=tokenizer.token_length(longest)),
        seed=cfg.seed,
    )
    ids, labels = tokenizer.encode(train.sequences), torch.tensor(train.labels)
    for epoch in range(epochs):
        plan = LocalPlan(
            steps=local_steps(len(ids), cfg.batch_size, 1.0),
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            seed=cfg.seed + epoch,
        )
        train_local(model, ids, labels, plan, CPU, dp=None)
    return evaluate_classifier(model, tokenizer.encode(test.sequences), torch.tensor(test.labels), CPU)[1]


def kmer_counts(sequences: tuple[str, ...], k: int = 4) -> torch.Tensor:
    index = {"".join(p): i for i, p in enumerate(itertools.product("ACGT", repeat=k))}
    counts = np.zeros((len(sequences), len(index)), dtype=np.float32)
    for row, seq in enumerate(sequences):
        for start in range(len(seq) - k + 1):
            column = index.get(seq[start : start + k])
            if column is not None:
                counts[row, column] += 1
    return torch.from_numpy(counts / counts.sum(1, keepdims=True).clip(min=1))


def kmer_logistic_regression(train: SequenceDataset, test: SequenceDataset) -> float:
    x, y = kmer_counts(train.sequences), torch.tensor(train.labels)
    mean, std = x.mean(0), x.std(0) + 1e-6
    linear = torch.nn.Linear(x.shape[1], len(train.label_names))
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear((x - mean) / std), y)
        loss = loss + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    predictions = linear((kmer_counts(test.sequences) - mean) / std).argmax(-1)
    return (predictions == torch.tensor(test.labels)).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=TrainingConfig().rounds)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="one run per seed (partition, initialisation, training)"
    )
    parser.add_argument("--partition", default="dirichlet", choices=["iid", "label-skew", "dirichlet"])
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration")
    parser.add_argument("--out", type=Path, default=None, help="folder for the simulations")
    args = parser.parse_args()
    train, test = load_bundled("train"), load_bundled("test")
    out = args.out or Path(tempfile.mkdtemp(prefix="fedgen-quality-"))
    federated = (
        (f"{args.sites}-site federated, no DP", None),
        (f"{args.sites}-site federated, DP ε={args.epsilon:g}", args.epsilon),
    )

    accuracies: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}

    def record(label: str, accuracy: float, start: float) -> None:
        accuracies.setdefault(label, []).append(accuracy)
        seconds.setdefault(label, []).append(time.perf_counter() - start)

    for seed in args.seeds:
        cfg = TrainingConfig(rounds=args.rounds, seed=seed)
        epochs = round(cfg.rounds * cfg.local_epochs)
        start = time.perf_counter()
        record("centralized, no DP", centralized(train, test, cfg, epochs), start)
        for label, epsilon in federated:
            start = time.perf_counter()
            result = fedgen.simulate(
                sites=args.sites,
                rounds=cfg.rounds,
                epsilon=epsilon,
                seed=seed,
                partition_scheme=args.partition,
                alpha=args.alpha,
                out=out / f"seed-{seed}-{'dp' if epsilon else 'no-dp'}",
            )
            record(label, result.final_accuracy, start)
    start = time.perf_counter()
    record("4-mer logistic regression (reference)", kmer_logistic_regression(train, test), start)

    reference = float(np.mean(accuracies["centralized, no DP"]))
    print(
        f"\nmodel {cfg.model}, tokenizer {cfg.tokenizer}, {epochs} epochs in total "
        f"({cfg.rounds} rounds x {cfg.local_epochs:g} local epochs), test n={len(test)}, "
        f"seeds {args.seeds}, partition {args.partition}"
        + (f"({args.alpha:g})" if args.partition == "dirichlet" else "")
    )
    print(f"{'setting':44s} {'accuracy':>8s} {'(sd)':>7s} {'vs centralized':>15s} {'seconds':>8s}  per seed")
    for label, values in accuracies.items():
        mean, sd = float(np.mean(values)), float(np.std(values))
        print(
            f"{label:44s} {mean:8.4f} {sd:7.4f} {mean / reference:15.3f} "
            f"{np.mean(seconds[label]):8.1f}  {' '.join(f'{v:.4f}' for v in values)}"
        )
    (out / "quality.json").write_text(json.dumps({"accuracy": accuracies, "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
