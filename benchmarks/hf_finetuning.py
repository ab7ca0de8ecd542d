"""Fine-tuning a Nucleotide-Transformer-shaped checkpoint: what travels, and what DP costs.

For an ESM checkpoint of Nucleotide Transformer v2 50M's transformer shape (hidden 512,
12 layers, 16 heads, 6-mer vocabulary, rotary positions; built randomly, since nothing
is downloaded), measured side by side in one run:

1. update bytes per site per round: LoRA (r8 on query, value, plus the head), FFA-LoRA
   and full fine-tuning, as tensors and as the Flower ArrayRecord that carries them;
2. DP-SGD step time / non-DP step time, same model, same batch, steps interleaved, for
   LoRA (target <= 1.05) and full fine-tuning (target <= 1.3);
3. peak memory of training (resident set growth during training), each setting in a
   fresh process.

Run: ``python benchmarks/hf_finetuning.py`` (``--quick``: a tiny shape, a smoke test).
Figures go to ``benchmarks/results/hf_finetuning.json`` and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
from pathlib import Path

from worker_process import rss_mib, run_worker, timed_step  # a sibling: benchmarks run as scripts

import fedgen  # noqa: F401  (sovereign switches before torch, transformers, flwr)

RESULTS = Path(__file__).parent / "results" / "hf_finetuning.json"
SEQUENCE_BASES = 500  # the enhancer task's length: 86 tokens of 6-mers


def _setting(folder: Path, finetune: str):
    from fedgen.config import TrainingConfig
    from fedgen.model_source import LocalBase, build_classifier, resolve_model_config, sequence_encoder

    config = resolve_model_config(
        str(folder), TrainingConfig(finetune=finetune), num_labels=2, max_bases=SEQUENCE_BASES
    )
    model = build_classifier(config, LocalBase(folder))
    encoder = sequence_encoder(config, "", LocalBase(folder))
    return config, model, encoder


def _batch(encoder, max_len: int, batch_size: int):
    import random

    import torch

    rng = random.Random(0)
    sequences = ["".join(rng.choice("ACGT") for _ in range(SEQUENCE_BASES)) for _ in range(batch_size)]
    return encoder.encode(sequences, max_length=max_len), torch.tensor([i % 2 for i in range(batch_size)])


def _optimizers(model, dp: bool, ids, labels):
    """A training step function for ``model`` (DP-SGD through Opacus' hooks, or plain AdamW)."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    module = model.train()
    if dp:
        loader = DataLoader(TensorDataset(ids, labels), batch_size=len(ids))
        module, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, grad_sample_mode="hooks",
        )  # fmt: skip
    criterion = torch.nn.CrossEntropyLoss()

    return timed_step(module, optimizer, criterion, ids, labels)


def worker(folder: Path, finetune: str, mode: str, steps: int, batch_size: int) -> dict:
    """One process: ``mode`` "ratio" interleaves DP and non-DP steps; "dp"/"plain" measure memory."""
    import copy

    import torch

    torch.manual_seed(0)
    config, model, encoder = _setting(folder, finetune)
    ids, labels = _batch(encoder, config.max_len, batch_size)
    if mode == "ratio":
        plain, private = _optimizers(model, False, ids, labels), _optimizers(copy.deepcopy(model), True, ids, labels)
        plain(), private()  # warm-up
        times = {"plain": [], "dp": []}
        for _ in range(steps):
            times["plain"].append(plain())
            times["dp"].append(private())
        medians = {k: statistics.median(v) for k, v in times.items()}
        return {"plain_step_s": medians["plain"], "dp_step_s": medians["dp"], "ratio": medians["dp"] / medians["plain"]}
    before = rss_mib()
    step = _optimizers(model, mode == "dp", ids, labels)
    for _ in range(steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model_rss_mib": before, "peak_rss_mib": peak, "training_growth_mib": peak - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape and few steps: a smoke test")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from fedgen.hf.random import NT_50M_SHAPE, TINY_SHAPE, esm_checkpoint
    from fedgen.params import arrays_to_record, to_numpy, trainable_tensors

    steps = 2 if args.quick else args.steps
    with tempfile.TemporaryDirectory(prefix="fedgen-bench-") as tmp:
        folder = esm_checkpoint(Path(tmp) / "nt", shape=TINY_SHAPE if args.quick else NT_50M_SHAPE)
        rows = {}
        for finetune in ("lora", "ffa-lora", "full"):
            config, model, _ = _setting(folder, finetune)
            arrays = to_numpy(trainable_tensors(model))
            rows[finetune] = {
                "total_parameters": config.total_parameters,
                "trainable_parameters": config.trainable_parameters,
                "update_tensor_bytes": sum(a.nbytes for a in arrays.values()),
                "update_record_bytes": arrays_to_record(arrays).count_bytes(),
            }
            del model
        for finetune in ("lora", "full"):
            rows[finetune] |= run_worker(__file__, folder, finetune, "ratio", steps, args.batch_size)
            for mode in ("plain", "dp"):
                memory = run_worker(__file__, folder, finetune, mode, steps, args.batch_size)
                rows[finetune][f"{mode}_peak_rss_mib"] = memory["peak_rss_mib"]
                rows[finetune][f"{mode}_training_growth_mib"] = memory["training_growth_mib"]
    full = rows["full"]["update_record_bytes"]
    report = {
        "command": "python benchmarks/hf_finetuning.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, torch CPU",
        "shape": "tiny" if args.quick else "Nucleotide Transformer v2 50M (ESM, 6-mer, rotary), random weights",
        "batch_size": args.batch_size,
        "sequence_bases": SEQUENCE_BASES,
        "settings": rows,
        "update_bytes_vs_full": {k: v["update_record_bytes"] / full for k, v in rows.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        folder, finetune, mode, steps, batch_size = sys.argv[2:7]
        print(json.dumps(worker(Path(folder), finetune, mode, int(steps), int(batch_size))))
    else:
        main()
