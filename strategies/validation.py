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
        distance = _squared_distance(tensor, expected)
        if distance is None:
            return f"tensor {name!r} holds NaN or infinite values"
        squared += distance
    norm = squared**0.5
    if policy.max_update_norm is not None and norm > policy.max_update_norm:
        return f"update norm {norm:.4g} exceeds the bound {policy.max_update_norm:g}"
    return None


_CHUNK = 2**18  # values per step: the temporaries stay a few MB whatever the tensor's size


def _squared_distance(tensor: np.ndarray, reference: np.ndarray) -> float | None:
    """Squared L2 distance, in float64, chunk by chunk; None if ``tensor`` is not all finite."""
    tensor, reference = tensor.reshape(-1), reference.reshape(-1)
    total = 0.0
    for start in range(0, tensor.size, _CHUNK):
        part = tensor[start : start + _CHUNK]
        if not np.isfinite(part).all():
            return None
        diff = np.subtract(part, reference[start : start + _CHUNK], dtype=np.float64)
        total += float(np.dot(diff, diff))
    return total
