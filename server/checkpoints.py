"""Global model checkpoints: one safetensors file per round, named by round and model digest.

A checkpoint's header holds the round and the model config as metadata, and the
`fedgen.params.model_digest` of tensors and metadata together under ``"digest"``: that
digest is the model's identity in the file name, the lineage and any export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from fedgen import atomic
from fedgen.params import DIGEST_METADATA_KEY, NamedArrays, model_digest, read_model_file


def checkpoint_name(server_round: int, digest: str) -> str:
    return f"round-{server_round:04d}-{digest[:16]}.safetensors"


def checkpoint_metadata(server_round: int, model_config_json: str) -> dict[str, str]:
    """The header metadata of a round's checkpoint, which its model digest covers."""
    return {"round": str(server_round), "model_config": model_config_json}


def checkpoint_digest(server_round: int, arrays: NamedArrays, model_config_json: str) -> str:
    """The model digest the checkpoint of these tensors at this round has (and is named by)."""
    return model_digest(arrays, checkpoint_metadata(server_round, model_config_json))


def save_checkpoint(
    directory: Path, server_round: int, arrays: NamedArrays, model_config_json: str
) -> tuple[Path, str]:
    """Write the round's global tensors atomically; return (path, model digest)."""
    directory.mkdir(parents=True, exist_ok=True)
    metadata = checkpoint_metadata(server_round, model_config_json)
    digest = model_digest(arrays, metadata)
    path = directory / checkpoint_name(server_round, digest)
    with atomic.replacing(path) as temporary:
        save_file(
            {name: np.ascontiguousarray(a) for name, a in arrays.items()},
            str(temporary),
            metadata={**metadata, DIGEST_METADATA_KEY: digest},
        )
    return path, digest


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a checkpoint's tensors and metadata.

    Raises
    ------
    ValueError
        If the file is unreadable, lacks its digest, or its tensors and metadata do not
        match the digest it records.
    """
    arrays, metadata = read_model_file(path)
    recorded = metadata.get(DIGEST_METADATA_KEY)
    if recorded is None:
        raise ValueError(f"{path}: not a fedgen checkpoint (its header records no {DIGEST_METADATA_KEY!r})")
    covered = {key: value for key, value in metadata.items() if key != DIGEST_METADATA_KEY}
    if model_digest(arrays, covered) != recorded:
        raise ValueError(f"{path}: tensors and metadata do not match the digest recorded in the file")
    return arrays, metadata
