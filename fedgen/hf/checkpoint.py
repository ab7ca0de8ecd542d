"""A Hugging Face checkpoint folder: what it holds, its digest, and loading it offline.

The base digest pins a checkpoint across sites: SHA-256 over the domain string
``fedgen hf base v1\\0``, the canonical encoding of its weight tensors (`fedgen.params`,
bfloat16 widened to float32, which is exact), then, in name order, each config,
tokenizer and code file's name and bytes. Two folders with the same digest hold the
same weights, the same tokenizer and the same modeling code.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedgen.errors import InputError
from fedgen.params import hash_arrays

CONFIG_FILE = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
_DOMAIN = b"fedgen hf base v1\0"


class CheckpointError(InputError):
    """A model folder cannot be used; the message names the folder and what is wrong."""


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint folder holds, read without loading its weights.

    ``code_files``: modeling code shipped with the checkpoint (``*.py``), which runs only
    when a site opts in with ``trust_remote_code``; ``code_digest`` covers those files.
    """

    folder: Path
    config: dict
    model_type: str
    weight_files: tuple[Path, ...]
    code_files: tuple[Path, ...]
    code_digest: str | None

    @property
    def remote_code(self) -> bool:
        return "auto_map" in self.config


def is_checkpoint_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Inspect a checkpoint folder.

    Raises
    ------
    CheckpointError
        If the folder is missing, has no readable ``config.json`` (naming the line of a
        JSON error), no ``model_type`` or no weight file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found")
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}; not a Hugging Face model folder") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise CheckpointError(f"{config_path}: model_type: missing; cannot tell the architecture")
    weights = tuple(sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()))
    if not weights:
        raise CheckpointError(f"{folder}: no weight file (*.safetensors or *.bin)")
    code = tuple(sorted(folder.glob("*.py")))
    return Checkpoint(
        folder=folder,
        config=config,
        model_type=config["model_type"],
        weight_files=weights,
        code_files=code,
        code_digest=_files_digest(code) if code else None,
    )


def _files_digest(files: tuple[Path, ...]) -> str:
    h = hashlib.sha256()
    _hash_files(h, files)
    return h.hexdigest()


def _hash_files(h: hashlib._Hash, files: tuple[Path, ...]) -> None:
    h.update(struct.pack("<Q", len(files)))
    for path in sorted(files, key=lambda p: p.name):
        for field in (path.name.encode(), path.read_bytes()):
            h.update(struct.pack("<Q", len(field)))
            h.update(field)


def weight_tensors(checkpoint: Checkpoint) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint's weight files, by name, as numpy arrays.

    Raises
    ------
    CheckpointError
        If a weight file cannot be read, or two files hold a tensor of the same name.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in checkpoint.weight_files:
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    loaded = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            else:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, SafetensorError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: cannot read weights ({exc})") from None
        for name, tensor in loaded.items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} also appears in another weight file")
            if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; widening is exact
                tensor = tensor.float()
            tensors[name] = tensor.detach().cpu().numpy()
    return tensors


def base_digest(checkpoint: Checkpoint) -> str:
    """The checkpoint's digest: weights, config, tokenizer and code files (module docstring)."""
    h = hashlib.sha256(_DOMAIN)
    hash_arrays(h, weight_tensors(checkpoint))
    folder = checkpoint.folder
    described = tuple(folder / name for name in (CONFIG_FILE, *TOKENIZER_FILES) if (folder / name).is_file())
    _hash_files(h, described + checkpoint.code_files)
    return h.hexdigest()
