"""What DP-SGD costs per step, for each of Opacus' grad-sample modes.

DP-SGD step time / non-DP step time, same model, same batch, steps interleaved (one
plain step, then one step of each mode, repeated; medians), for:

* the built-in DNA transformer, full fine-tuning: presets nano, tiny, small
  (`fedgen.model.build_model`; target <= 1.3);
* LoRA (r8 on query, value, plus the head) on Hugging Face ESM checkpoints of a tiny and
  of Nucleotide Transformer v2 50M's shape (`fedgen.hf.random.esm_checkpoint`, built
  randomly: nothing is downloaded; target <= 1.05).

Modes: hooks, functorch, ew (torch's expanded weights; fedgen's first choice,
`fedgen.client.dp_check.PREFERRED_MODES`) and ghost (ghost clipping: `make_private(..., grad_sample_mode="ghost")` wraps
the criterion, whose loss runs the two backward passes). Peak memory of training (resident
set growth above the built model) is measured for each mode in a fresh process.

Run: ``python benchmarks/dp_overhead.py`` (``--quick``: nano and the tiny ESM, few steps, memory
of plain and fedgen's preferred modes only).
Figures go to ``benchmarks/results/dp_overhead.json`` and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
from pathlib import Path

from worker_process import rss_mib, run_worker, timed_step  # a sibling: benchmarks run as scripts

import fedgen  # noqa: F401  (sovereign switches before torch, transformers, flwr)
from fedgen.client.dp_check import PREFERRED_MODES

RESULTS = Path(__file__).parent / "results" / "dp_overhead.json"
MODES = ("hooks", "functorch", "ew", "ghost")
SEQUENCE_BASES = 500  # the enhancer task's length
PRESETS = ("nano", "tiny", "small")
CHECKPOINTS = ("esm-tiny", "esm-nt50m")
TARGETS = {"full": 1.3, "lora": 1.05}


def _sequences(batch_size: int) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice("ACGT") for _ in range(SEQUENCE_BASES)) for _ in range(batch_size)]


def _setting(name: str, folder: Path | None, batch_size: int):
    """(model, ids, labels) of setting ``name``: a preset, or LoRA on the checkpoint in ``folder``."""
    import torch

    labels = torch.tensor([i % 2 for i in range(batch_size)])
    if folder is None:
        from fedgen.config import TrainingConfig
        from fedgen.model import build_model, preset_config
        from fedgen.tokenizers import make_tokenizer

        tokenizer = make_tokenizer(TrainingConfig().tokenizer)
        config = preset_config(name, vocab_size=tokenizer.vocab_size, max_len=tokenizer.token_length(SEQUENCE_BASES))
        return build_model(config, seed=0), tokenizer.encode(_sequences(batch_size)), labels
    from fedgen.config import TrainingConfig
    from fedgen.model_source import LocalBase, build_classifier, resolve_model_config, sequence_encoder

    config = resolve_model_config(str(folder), TrainingConfig(finetune="lora"), num_labels=2, max_bases=SEQUENCE_BASES)
    model = build_classifier(config, LocalBase(folder))
    encoder = sequence_encoder(config, "", LocalBase(folder))
    return model, encoder.encode(_sequences(batch_size), max_length=config.max_len), labels


def _stepper(model, mode: str, ids, labels):
    """A function running one optimizer step of ``model``: plain AdamW, or DP-SGD in ``mode``."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    module, criterion = model.train(), torch.nn.CrossEntropyLoss()
    if mode != "plain":
        loader = DataLoader(TensorDataset(ids, labels), batch_size=len(ids))
        made = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode,
        )  # fmt: skip
        # ghost clipping hands back its own criterion, whose loss runs both backward passes
        module, optimizer, criterion = (made[0], made[1], made[2]) if mode == "ghost" else (made[0], made[1], criterion)

    return timed_step(module, optimizer, criterion, ids, labels)


def ratio_worker(name: str, folder: Path | None, steps: int, batch_size: int) -> dict:
    """Interleave plain steps with each mode's steps on copies of one model; medians and ratios."""
    import copy

    import torch

    torch.manual_seed(0)
    model, ids, labels = _setting(name, folder, batch_size)
    steppers, errors = {"plain": _stepper(model, "plain", ids, labels)}, {}
    for mode in MODES:
        try:
            steppers[mode] = _stepper(copy.deepcopy(model), mode, ids, labels)
            steppers[mode]()  # warm-up, and the proof that the mode works on this model
        except Exception as exc:  # a mode that does not support the model is a result, not a crash
            steppers.pop(mode, None)
            errors[mode] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    steppers["plain"]()
    times: dict[str, list[float]] = {mode: [] for mode in steppers}
    for _ in range(steps):
        for mode, step in steppers.items():
            times[mode].append(step())
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": trainable,
        "tokens": int(ids.shape[1]),
        "step_seconds": medians,
        "ratio": {mode: medians[mode] / medians["plain"] for mode in medians if mode != "plain"},
        "errors": errors,
    }


def memory_worker(name: str, folder: Path | None, mode: str, steps: int, batch_size: int) -> dict:
    """Peak resident set growth of ``steps`` training steps in ``mode``, above the built model."""
    import torch

    torch.manual_seed(0)
    model, ids, labels = _setting(name, folder, batch_size)
    before = rss_mib()
    step = _stepper(model, mode, ids, labels)
    for _ in range(steps):
        step()
    return {"training_growth_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="nano and a tiny ESM, few steps: a smoke test")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from fedgen.hf.random import NT_50M_SHAPE, TINY_SHAPE, esm_checkpoint

    steps = 2 if args.quick else args.steps
    batch = 8 if args.quick else args.batch_size
    presets = PRESETS[:1] if args.quick else PRESETS
    checkpoints = CHECKPOINTS[:1] if args.quick else CHECKPOINTS
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fedgen-bench-") as tmp:
        folders: dict[str, str] = {}
        for name in checkpoints:
            shape = NT_50M_SHAPE if name == "esm-nt50m" else TINY_SHAPE
            folders[name] = str(esm_checkpoint(Path(tmp) / name, shape=shape))
        for name in (*presets, *checkpoints):
            folder = folders.get(name, "")
            row = {"finetune": "lora" if folder else "full"} | run_worker(
                __file__, "ratio", name, folder, str(steps), str(batch)
            )
            # --quick: memory of plain and fedgen's own modes only (each mode costs a process)
            measured = ("plain", *PREFERRED_MODES) if args.quick else ("plain", *row["ratio"])
            row["peak_growth_mib"] = {
                mode: run_worker(__file__, "memory", name, folder, mode, str(min(steps, 3)), str(batch))[
                    "training_growth_mib"
                ]
                for mode in measured
            }
            row["fastest_mode"] = min(row["ratio"], key=row["ratio"].get)
            row["leanest_mode"] = min(set(row["ratio"]) & set(measured), key=row["peak_growth_mib"].get)
            row["target"] = TARGETS[row["finetune"]]
            row["meets_target"] = {mode: ratio <= row["target"] for mode, ratio in row["ratio"].items()}
            print(json.dumps({name: row}), flush=True)
            rows[name] = row
    report = {
        "command": "python benchmarks/dp_overhead.py"
        + (" --quick" if args.quick else "")
        + (f" --steps {args.steps}" if args.steps != parser.get_default("steps") else "")
        + (f" --batch-size {args.batch_size}" if args.batch_size != parser.get_default("batch_size") else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, torch CPU",
        "batch_size": batch,
        "sequence_bases": SEQUENCE_BASES,
        "steps_interleaved": steps,
        "modes": list(MODES),
        "fedgen_modes": list(PREFERRED_MODES),
        "settings": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, name, folder, *rest = sys.argv[2:]
        where = Path(folder) if folder else None
        if kind == "ratio":
            print(json.dumps(ratio_worker(name, where, int(rest[0]), int(rest[1]))))
        else:
            print(json.dumps(memory_worker(name, where, rest[0], int(rest[1]), int(rest[2]))))
    else:
        main()
