"""What ``--model`` names, and the one place that turns a run's model config into a model
and a sequence encoder on either side.

A model is a built-in preset (fedgen's DNA transformer, trained from scratch or fully
fine-tuned) or a local Hugging Face checkpoint folder (fine-tuned with LoRA by default).
Torch and transformers are imported only when a model is actually built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError
from .model_config import PRESETS, AnyModelConfig, HFModelConfig, ModelConfig, preset_config

if TYPE_CHECKING:
    from torch import nn

    from .config import TrainingConfig

log = logging.getLogger(__name__)

BUILTIN_ARCHITECTURE = "fedgen-dna-transformer"
# Models that number positions after the padding index hold two fewer real positions.
_PADDING_OFFSET_TYPES = ("esm", "roberta", "xlm-roberta", "camembert")


def checkpoint_folder(model: str, relative_to: Path | None = None) -> Path | None:
    """The checkpoint folder ``model`` names, or None for a preset.

    Raises
    ------
    InputError
        If ``model`` is neither a preset nor an existing folder.
    """
    if model in PRESETS:
        return None
    folder = Path(model)
    if not folder.is_absolute() and relative_to is not None:
        folder = relative_to / folder
    if not folder.is_dir():
        raise InputError(
            f"model {model!r} is neither a built-in preset ({', '.join(PRESETS)}) nor a Hugging Face model folder"
        )
    return folder.absolute()


def resolve_model_config(
    model: str,
    training: TrainingConfig,
    *,
    num_labels: int,
    max_bases: int,
    relative_to: Path | None = None,
) -> AnyModelConfig:
    """The run's model config for ``model`` (a preset or a checkpoint folder).

    A checkpoint is read, digested and built once here (seeded), to fix the LoRA targets,
    the parameter counts and, for FFA-LoRA, the frozen A factors every site must rebuild.
    """
    folder = checkpoint_folder(model, relative_to)
    if folder is None:
        if training.finetune not in ("auto", "full"):
            raise InputError(
                f"finetune {training.finetune!r} needs a pretrained base: built-in presets start from "
                "random weights and train fully (pass a Hugging Face model folder as the model)"
            )
        from .tokenizers import make_tokenizer

        tokenizer = make_tokenizer(training.tokenizer)
        return preset_config(
            model,
            vocab_size=tokenizer.vocab_size,
            max_len=tokenizer.token_length(max_bases),
            num_labels=num_labels,
            pad_id=tokenizer.pad_id,
        )
    from .hf.checkpoint import base_digest, read_checkpoint
    from .hf.classifier import build_hf_classifier, default_lora_targets, describe_parameters, frozen_adapter_digest
    from .hf.tokenizer import HFSequenceTokenizer

    checkpoint = read_checkpoint(folder)
    tokenizer = HFSequenceTokenizer(folder)
    max_len = tokenizer.token_length(max_bases)
    positions = checkpoint.config.get("max_position_embeddings")
    if isinstance(positions, int):
        room = positions - 2 if checkpoint.model_type in _PADDING_OFFSET_TYPES else positions
        if max_len > room:
            log.warning(
                "sequences of %d bases make %d tokens; %s holds %d: truncated", max_bases, max_len, folder, room
            )
            max_len = room
    finetune = "lora" if training.finetune == "auto" else training.finetune
    config = HFModelConfig(
        architecture="",
        model_type=checkpoint.model_type,
        base_digest=base_digest(checkpoint),
        num_labels=num_labels,
        max_len=max_len,
        finetune=finetune,
        lora_rank=training.lora_rank,
        lora_alpha=training.lora_alpha,
        lora_dropout=training.lora_dropout,
        seed=training.seed,
        code_digest=checkpoint.code_digest,
    )
    if finetune != "full":
        targets = tuple(training.lora_target_modules)
        if not targets:
            from .hf.classifier import load_sequence_classifier

            probe = load_sequence_classifier(checkpoint, num_labels, trust_remote_code=training.trust_remote_code)
            targets = default_lora_targets(checkpoint.model_type, probe)
        config = replace(config, target_modules=targets)
    built = build_hf_classifier(checkpoint, config, tokenizer.pad_id, trust_remote_code=training.trust_remote_code)
    total, trainable = describe_parameters(built.model)
    return replace(
        config,
        architecture=type(built.model.get_base_model() if finetune != "full" else built.model).__name__,
        total_parameters=total,
        trainable_parameters=trainable,
        frozen_digest=frozen_adapter_digest(built.model) if finetune == "ffa-lora" else None,
    )


class BaseModelMismatch(InputError):
    """A side's local base checkpoint is not the one the run is pinned to."""


@dataclass(frozen=True)
class LocalBase:
    """A side's own copy of the run's base checkpoint, checked against the run's digest."""

    folder: Path
    trust_remote_code: bool = False

    def checked(self, config: HFModelConfig):
        """The checkpoint, after its digest matched ``config.base_digest``.

        Raises
        ------
        BaseModelMismatch
            Naming both digests, if this folder holds another base.
        """
        from .hf.checkpoint import read_checkpoint

        checkpoint = read_checkpoint(self.folder)
        local = self.digest(checkpoint)
        if local != config.base_digest:
            raise BaseModelMismatch(
                f"the local base model has digest {local[:16]}…, the run is pinned to {config.base_digest[:16]}… "
                f"({config.architecture}): this site holds a different checkpoint"
            )
        return checkpoint

    def digest(self, checkpoint) -> str:  # noqa: ANN001 - a fedgen.hf.checkpoint.Checkpoint
        """The base digest of ``checkpoint`` (this folder's); a long-lived site caches it."""
        from .hf.checkpoint import base_digest

        return base_digest(checkpoint)


def sequence_encoder(config: AnyModelConfig, tokenizer: str, base: LocalBase | None):
    """The encoder of DNA strings into id tensors that ``config``'s model reads."""
    if isinstance(config, ModelConfig):
        from .tokenizers import make_tokenizer

        return make_tokenizer(tokenizer)
    from .hf.tokenizer import HFSequenceTokenizer

    return HFSequenceTokenizer(_require_base(config, base).folder)


def build_classifier(
    config: AnyModelConfig, base: LocalBase | None, *, seed: int = 0, deterministic: bool = False
) -> nn.Module:
    """The classifier ``config`` describes, ``forward(ids) -> logits``; trainable = what travels.

    ``deterministic`` builds it without dropout (for the per-sample gradient check).

    Raises
    ------
    BaseModelMismatch
        If ``base`` is not the checkpoint the run is pinned to.
    """
    if isinstance(config, ModelConfig):
        from .model import build_model

        return build_model(replace(config, dropout=0.0) if deterministic else config, seed=seed)
    from .hf.classifier import build_hf_classifier, frozen_adapter_digest
    from .hf.tokenizer import HFSequenceTokenizer

    local = _require_base(config, base)
    checkpoint = local.checked(config)
    pad_id = HFSequenceTokenizer(local.folder).pad_id
    model = build_hf_classifier(
        checkpoint, config, pad_id, trust_remote_code=local.trust_remote_code, deterministic=deterministic
    )
    if config.frozen_digest is not None and frozen_adapter_digest(model.model) != config.frozen_digest:
        raise BaseModelMismatch("the frozen LoRA A factors built here differ from the run's: cannot train FFA-LoRA")
    return model


def _require_base(config: HFModelConfig, base: LocalBase | None) -> LocalBase:
    if base is None:
        raise InputError(
            f"the run fine-tunes a Hugging Face model ({config.architecture}, base {config.base_digest[:16]}…): "
            "name this side's copy of the base checkpoint (site.toml: base_model)"
        )
    return base


def model_summary(config: AnyModelConfig, source: str, model: nn.Module | None = None) -> dict[str, Any]:
    """The ``"model"`` object of ``--json``: source, architecture, parameter counts, base digest."""
    if isinstance(config, HFModelConfig):
        return {
            "source": source,
            "architecture": config.architecture,
            "finetune": config.finetune,
            "total_parameters": config.total_parameters,
            "trainable_parameters": config.trainable_parameters,
            "base_digest": config.base_digest,
        }
    from .model import build_model, count_parameters

    built = model if model is not None else build_model(config)
    total = count_parameters(built)
    return {
        "source": source,
        "architecture": BUILTIN_ARCHITECTURE,
        "finetune": "full",
        "total_parameters": total,
        "trainable_parameters": count_parameters(built, trainable_only=True),
        "base_digest": None,
    }
