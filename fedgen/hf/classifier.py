"""A sequence classifier from a checkpoint folder, with LoRA through peft, behind the
``forward(ids) -> logits`` interface of fedgen's built-in model.

The frozen base is never trained and never sent: with LoRA only the adapters and the
classification head require gradients, and fedgen sends exactly the tensors that do.
"""

from __future__ import annotations

import inspect
import logging
import warnings

import torch
from torch import nn

from fedgen.model_config import HFModelConfig
from fedgen.params import digest, to_numpy

from .checkpoint import Checkpoint, CheckpointError

log = logging.getLogger(__name__)

# LoRA targets per architecture, by the real module names (peft's own table lacks ESM).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "esm": ("query", "value"),  # Nucleotide Transformer v1/v2
    "bert": ("query", "value"),  # DNABERT
}
_TARGET_GUESSES = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("Wqkv",))


def default_lora_targets(model_type: str, model: nn.Module) -> tuple[str, ...]:
    """The modules LoRA wraps by default for an architecture, checked against the model.

    Raises
    ------
    CheckpointError
        If no known naming matches the model's Linear layers (the run must name them).
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    known = LORA_TARGETS.get(model_type) or tuple(PEFT_TARGETS.get(model_type, ()))
    for candidate in (known, *_TARGET_GUESSES):
        if candidate and set(candidate) <= linear_names:
            return tuple(candidate)
    raise CheckpointError(
        f"no default LoRA target modules for model type {model_type!r}: name them with "
        f"training.lora_target_modules (its Linear layers: {', '.join(sorted(linear_names))})"
    )


def _dropout_free(config) -> None:
    """Zero every dropout probability of a transformers config, in place (deterministic
    forward passes: ESM's attention dropout is a float in the config, not a module)."""
    for key, value in list(vars(config).items()):
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)


def load_sequence_classifier(
    checkpoint: Checkpoint, num_labels: int, *, trust_remote_code: bool = False, deterministic: bool = False
) -> nn.Module:
    """The checkpoint as transformers' AutoModelForSequenceClassification, offline.

    The model's ``fedgen_new_modules`` names the modules the checkpoint holds no weights
    for (a new classification head; BERT's pooler in a masked-LM checkpoint): they start
    from the seeded initialisation and must train, and travel, with the head.

    Raises
    ------
    CheckpointError
        If the checkpoint ships its own modeling code and ``trust_remote_code`` is off, or
        transformers cannot build a sequence classifier from it.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    folder = checkpoint.folder
    if checkpoint.remote_code and not trust_remote_code:
        files = ", ".join(p.name for p in checkpoint.code_files) or "code named in its auto_map"
        raise CheckpointError(
            f"{folder}: this checkpoint ships its own modeling code ({files}); fedgen runs it only if the "
            "site opts in with `trust_remote_code = true` in its site.toml"
        )
    hf_logging.set_verbosity_error()  # weights of a new classification head are expected to be missing
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(
            str(folder), num_labels=num_labels, local_files_only=True, trust_remote_code=trust_remote_code
        )
        if deterministic:
            _dropout_free(config)
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            str(folder),
            config=config,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=True,
            dtype=torch.float32,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder}: transformers cannot build a sequence classifier from it ({exc})") from None
    missing = set(loading.get("missing_keys", ())) | {key for key, *_ in loading.get("mismatched_keys", ())}
    model.fedgen_new_modules = sorted({key.rsplit(".", 1)[0] for key in missing})
    return model


class HFClassifier(nn.Module):
    """Wraps a transformers (or peft) sequence classifier as ``forward(ids) -> logits``.

    The attention mask is derived from padding. Position and token-type ids are passed as
    explicit ``[B, T]`` tensors where the model would otherwise expand a batch-1 buffer,
    which Opacus' per-sample embedding gradients cannot handle.
    """

    def __init__(self, model: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.model = model
        self.pad_id = pad_id
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        accepted = inspect.signature(base.forward).parameters
        self._token_types = "token_type_ids" in accepted
        embeddings = getattr(getattr(base, base.base_model_prefix, base), "embeddings", None)
        # Models that number positions after padding (ESM, RoBERTa) compute [B, T] ids themselves.
        self._positions = "position_ids" in accepted and not hasattr(embeddings, "padding_idx")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": ids, "attention_mask": (ids != self.pad_id).long()}
        if self._token_types:
            kwargs["token_type_ids"] = torch.zeros_like(ids)
        if self._positions:
            kwargs["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
        return self.model(**kwargs).logits


def apply_finetuning(model: nn.Module, config: HFModelConfig) -> nn.Module:
    """Freeze the base and add what ``config.finetune`` trains: LoRA adapters and the head
    (``lora``), B factors and the head (``ffa-lora``), or everything (``full``)."""
    if config.finetune == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    # peft keeps the head ("classifier"/"score") trainable for SEQ_CLS; other new modules join it.
    new_modules = [m for m in getattr(model, "fedgen_new_modules", []) if not m.startswith(("classifier", "score"))]
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        modules_to_save=new_modules or None,
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
    )
    try:
        with warnings.catch_warnings():  # peft asks transformers a question it has deprecated
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = get_peft_model(model, lora)
    except ValueError as exc:
        raise CheckpointError(f"LoRA target modules {list(config.target_modules)}: {exc}") from None
    if config.finetune == "ffa-lora":
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return model


def frozen_adapter_digest(model: nn.Module) -> str:
    """Digest of the frozen LoRA A factors (FFA-LoRA), which every side must hold alike."""
    frozen = {name: p for name, p in model.named_parameters() if ".lora_A." in name and not p.requires_grad}
    return digest(to_numpy(frozen))


def build_hf_classifier(
    checkpoint: Checkpoint,
    config: HFModelConfig,
    pad_id: int,
    *,
    trust_remote_code: bool = False,
    deterministic: bool = False,
) -> HFClassifier:
    """Load the base, add the adapters, wrap it; seeded, so every side builds the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = load_sequence_classifier(
            checkpoint, config.num_labels, trust_remote_code=trust_remote_code, deterministic=deterministic
        )
        model = apply_finetuning(model, config)
    classifier = HFClassifier(model, pad_id)
    if config.finetune == "full":
        _freeze_unused(classifier)
    return classifier


def _freeze_unused(classifier: HFClassifier) -> None:
    """Freeze parameters classification never touches (ESM's contact head, say): they get
    no gradient, which Opacus refuses, and would travel for nothing."""
    ids = torch.full((1, 4), 1 if classifier.pad_id != 1 else 2, dtype=torch.long)
    classifier.zero_grad(set_to_none=True)
    classifier(ids).sum().backward()
    for param in classifier.parameters():
        if param.grad is None:
            param.requires_grad_(False)
        param.grad = None


def describe_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; LoRA's copy of the original head is not counted."""
    total = trainable = 0
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return total, trainable
