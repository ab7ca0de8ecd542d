"""Checks an update must pass before it may be aggregated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UpdatePolicy:
    """What the aggregator accepts from a site.

    Parameters
    ----------
    max_update_norm : float, optional
        Bound on the L2 norm of (site tensors - global tensors); None = no bound.
    max_update_bytes : int
        Largest tensor payload accepted from one site.
    min_updates : int
        Quorum: valid updates a round needs to commit.
    """

    max_update_norm: float | None = None
    max_update_bytes: int = 512 * 2**20
    min_updates: int = 1


def update_problem(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], policy: UpdatePolicy
) -> str | None:
    """Why ``update`` may not be aggregated against the global ``reference``, or None."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"tensor names differ from the global model: missing {missing[:3]}, unexpected {extra[:3]}"
    squared = 0.0
    for name, expected in reference.items():
        tensor = update[name]
        if tensor.shape != expected.shape:
            return f"tensor {name!r} has shape {tensor.shape}, the global model {expected.shape}"
        if tensor.dtype != expected.dtype:
            return f"tensor {name!r} has dtype {tensor.dtype}, the global model {expected.dtype}"
        if not np.isfinite(tensor).all():
            return f"tensor {name!r} holds NaN or infinite values"
        squared += float(np.sum((tensor.astype(np.float64) - expected) ** 2))
    norm = squared**0.5
    if policy.max_update_norm is not None and norm > policy.max_update_norm:
        return f"update norm {norm:.4g} exceeds the bound {policy.max_update_norm:g}"
    return None
