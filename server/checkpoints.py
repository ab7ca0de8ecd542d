"""Global model checkpoints: one safetensors file per round, named by round and digest."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fedgen.params import NamedArrays, digest


def checkpoint_name(server_round: int, model_digest: str) -> str:
    return f"round-{server_round:04d}-{model_digest[:16]}.safetensors"


def save_checkpoint(directory: Path, server_round: int, arrays: NamedArrays,
                    model_config_json: str) -> tuple[Path, str]:
    """Write the round's global tensors atomically; return (path, digest)."""
    directory.mkdir(parents=True, exist_ok=True)
    model_digest = digest(arrays)
    path = directory / checkpoint_name(server_round, model_digest)
    tmp = path.with_suffix(".tmp")
    save_file(
        {name: np.ascontiguousarray(a) for name, a in arrays.items()}, str(tmp),
        metadata={"round": str(server_round), "digest": model_digest, "model_config": model_config_json},
    )
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path, model_digest


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a checkpoint's tensors and metadata; raise ValueError if its digest is wrong."""
    arrays = load_file(str(path))
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("digest") and metadata["digest"] != digest(arrays):
        raise ValueError(f"{path}: tensors do not match the digest recorded in the file")
    return arrays, metadata
