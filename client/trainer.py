"""Local training on a site: DP-SGD through Opacus, or plain training for baselines.

Privacy accounting stays with the caller's ledger: the trainer starts Opacus'
accountant from the ledger's history and hands back the accountant's new history.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .ledger import Mechanism


@dataclass(frozen=True)
class LocalPlan:
    """How a site trains one round."""

    steps: int
    batch_size: int
    learning_rate: float
    seed: int
    proximal_mu: float = 0.0
    precision: str = "fp32"  # "bf16" or "fp16": autocast, never under DP (the caller refuses it)


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float
    accountant: str
    history: list[Mechanism]
    grad_sample_mode: str  # Opacus' per-sample gradient mode; one the site's check passed


@dataclass(frozen=True)
class LocalResult:
    mean_loss: float
    history: list[Mechanism]  # the accountant's history after training (DP only)


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """The sampling rate Opacus uses for a loader of ``batch_size``: 1 / batches per epoch."""
    return 1.0 / math.ceil(num_examples / batch_size)


def local_steps(num_examples: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps for ``epochs`` passes over ``num_examples`` at ``batch_size``."""
    return max(1, round(epochs * num_examples / batch_size))


def _cycle(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def train_local(
    model: nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    plan: LocalPlan,
    device: torch.device,
    dp: DPSettings | None,
) -> LocalResult:
    """Train ``model`` in place for ``plan.steps`` steps; DP-SGD when ``dp`` is given.

    With DP, batches are Poisson-sampled at rate batch_size / N and each per-sample
    gradient is clipped to ``dp.max_grad_norm`` before Gaussian noise is added. The
    FedProx proximal term is applied as a decoupled step after each update: it depends
    only on the weights, so it needs no per-sample clipping and costs no privacy.
    """
    torch.manual_seed(plan.seed)
    generator = torch.Generator().manual_seed(plan.seed)
    model.to(device).train()
    anchor = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=plan.learning_rate, weight_decay=0.01)
    loader = DataLoader(TensorDataset(ids, labels), batch_size=plan.batch_size, shuffle=True, generator=generator)
    engine = None
    trained_module: nn.Module = model
    if dp is not None:
        engine = PrivacyEngine(accountant=dp.accountant)
        engine.accountant.history = list(dp.history)
        trained_module, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=dp.grad_sample_mode,
        )
    criterion = nn.CrossEntropyLoss()
    autocast = _autocast(plan.precision, device)
    losses: list[float] = []
    batches = _cycle(loader)
    for _ in range(plan.steps):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        if len(x):
            with autocast:
                loss = criterion(trained_module(x), y)
            loss.backward()
            losses.append(loss.item())
        optimizer.step()
        if plan.proximal_mu > 0:
            _proximal_step(model, anchor, plan.learning_rate * plan.proximal_mu)
    if trained_module is not model:
        trained_module._close()  # remove Opacus hooks and grad samples; weights live in ``model``
    history = [] if engine is None else [tuple(h) for h in engine.accountant.history]
    expected_rate = poisson_sample_rate(len(ids), plan.batch_size)
    if history and history[-1][1] != expected_rate:
        # The budget check used expected_rate; a different one means the check was wrong.
        raise RuntimeError(f"Opacus sampled at rate {history[-1][1]}, fedgen accounted for {expected_rate}")
    return LocalResult(mean_loss=float(np.mean(losses)) if losses else math.nan, history=history)


_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass, as asked; float32 otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"precision bf16 requested but {device} does not support bfloat16")
    return torch.autocast(device.type, dtype=_PRECISIONS[precision])


def _proximal_step(model: nn.Module, anchor: Mapping[str, torch.Tensor], rate: float) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in anchor:
                param.sub_(rate * (param - anchor[name]))
