"""Trainable tensors <-> Flower records, and the canonical digest of named tensors.

Only trainable tensors travel between site and aggregator. Their digest is SHA-256 over
a canonical encoding (sorted names; for each: name, little-endian dtype, shape, C-order
little-endian bytes), so the same tensors give the same digest in any process on any
platform.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

NamedArrays = Mapping[str, np.ndarray]


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters that require gradients, by name, detached on the CPU."""
    return {
        name: param.detach().cpu()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def to_numpy(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy() for name, t in tensors.items()}


def arrays_to_record(arrays: NamedArrays) -> ArrayRecord:
    """Wrap named numpy arrays in an `ArrayRecord`, in sorted name order."""
    return ArrayRecord({name: Array(np.ascontiguousarray(arrays[name])) for name in sorted(arrays)})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unwrap an `ArrayRecord` into named numpy arrays."""
    return {name: array.numpy() for name, array in record.items()}


def load_trainable(model: nn.Module, arrays: NamedArrays) -> None:
    """Copy ``arrays`` into the model's trainable parameters; names and shapes must match.

    Raises
    ------
    ValueError
        Naming the missing, unexpected or mis-shaped tensors.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(arrays))
    extra = sorted(set(arrays) - set(params))
    if missing or extra:
        raise ValueError(f"tensor names do not match the model: missing {missing}, unexpected {extra}")
    for name, param in params.items():
        value = arrays[name]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.array(value, copy=True)).to(param.dtype))


def digest(arrays: NamedArrays) -> str:
    """SHA-256 hex digest of named arrays over their canonical encoding."""
    h = hashlib.sha256()
    h.update(struct.pack("<Q", len(arrays)))
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        canonical = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        for field in (name.encode(), canonical.dtype.str.encode()):
            h.update(struct.pack("<Q", len(field)))
            h.update(field)
        h.update(struct.pack("<Q", canonical.ndim))
        h.update(struct.pack(f"<{canonical.ndim}Q", *canonical.shape))
        data = canonical.tobytes(order="C")
        h.update(struct.pack("<Q", len(data)))
        h.update(data)
    return h.hexdigest()
