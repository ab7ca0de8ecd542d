"""The shape of the built-in DNA transformer and its named presets.

Light on purpose (no torch): the coordinator turns a run's configuration into a
`ModelConfig` before anything is submitted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a DNA transformer encoder.

    Parameters
    ----------
    vocab_size : int
        Number of token ids (from the tokenizer, special tokens included).
    max_len : int
        Longest token sequence the position table holds (CLS included).
    d_model, n_layers, n_heads, d_ff : int
        Width, depth, attention heads and feed-forward width.
    dropout : float
        Dropout after attention and feed-forward blocks.
    num_labels : int
        Classes of the classification head.
    pad_id : int
        Token id of padding; padded keys are masked out of attention and pooling.
    """

    vocab_size: int
    max_len: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    dropout: float = 0.1
    num_labels: int = 2
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        for field in ("vocab_size", "max_len", "d_model", "n_layers", "d_ff", "num_labels"):
            if getattr(self, field) < 1:
                raise ValueError(f"ModelConfig.{field} must be >= 1")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls(**json.loads(text))


# Width, depth, heads, feed-forward. Parameter counts are for vocab 261 (4-mer tokenizer)
# and max_len 512; `count_parameters(build_model(...))` gives the exact figure for yours.
PRESETS: dict[str, dict[str, int]] = {
    "nano": dict(d_model=32, n_layers=1, n_heads=2, d_ff=64),  # ~33 K: tests, and small data under DP
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, d_ff=128),  # ~0.12 M
    "small": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024),  # ~3.4 M
    "base": dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048),  # ~25.6 M
    "large": dict(d_model=768, n_layers=14, n_heads=12, d_ff=3072),  # ~99.8 M
}


def preset_config(preset: str, *, vocab_size: int, max_len: int, num_labels: int = 2, pad_id: int = 0) -> ModelConfig:
    """Return the `ModelConfig` of a named preset for a tokenizer and task."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(
        vocab_size=vocab_size,
        max_len=max_len,
        num_labels=num_labels,
        pad_id=pad_id,
        **PRESETS[preset],
    )


FINETUNE_MODES = ("full", "lora", "ffa-lora")
"""How a Hugging Face base is fine-tuned: every weight, LoRA adapters (A and B trained), or
FFA-LoRA (A frozen at its seeded initialisation, only B trained: FedAvg of B is then the
exact average of the products B·A, and the update is half the size)."""


@dataclass(frozen=True)
class HFModelConfig:
    """A sequence classifier fine-tuned from a Hugging Face checkpoint that every site holds.

    The checkpoint itself never travels: each site and the aggregator load their own copy,
    and ``base_digest`` pins which one (`fedgen.hf.checkpoint.base_digest`).

    Parameters
    ----------
    architecture : str
        The checkpoint's class for sequence classification, e.g. ``EsmForSequenceClassification``.
    model_type : str
        Its ``config.json`` model type (``esm``, ``bert``, ...), which picks the LoRA targets.
    base_digest : str
        SHA-256 over the checkpoint's tensors, config, tokenizer and code files.
    num_labels, max_len : int
        Classes, and the longest token sequence the run feeds the model.
    finetune : {"full", "lora", "ffa-lora"}
        What is trained (and so what travels), see `FINETUNE_MODES`.
    lora_rank, lora_alpha, lora_dropout, target_modules
        The adapters' shape and the modules they wrap (LoRA modes only).
    seed : int
        Seeds the adapters' and the head's initialisation, identical on every side.
    total_parameters, trainable_parameters : int
        Of the model as built, for people and the lineage.
    frozen_digest : str or None
        FFA-LoRA: digest of the frozen A factors, which every site must rebuild bit for bit.
    code_digest : str or None
        SHA-256 of the modeling code shipped inside the checkpoint (``*.py``), which runs
        only where an operator opted in with ``trust_remote_code``; None if it ships none.
    """

    architecture: str
    model_type: str
    base_digest: str
    num_labels: int
    max_len: int
    finetune: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    seed: int = 0
    total_parameters: int = 0
    trainable_parameters: int = 0
    frozen_digest: str | None = None
    code_digest: str | None = None
    kind: str = "hf"

    def __post_init__(self) -> None:
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"unknown finetune mode {self.finetune!r}; choose one of {', '.join(FINETUNE_MODES)}")
        if self.kind != "hf":
            raise ValueError("HFModelConfig.kind must be 'hf'")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HFModelConfig:
        return cls(**json.loads(text))


AnyModelConfig = ModelConfig | HFModelConfig


def model_config_from_json(text: str) -> AnyModelConfig:
    """The built-in or Hugging Face model config that ``to_json`` wrote."""
    values = json.loads(text)
    if values.get("kind") == "hf":
        return HFModelConfig(**values)
    return ModelConfig(**values)
