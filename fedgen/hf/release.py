"""A round's fine-tuned Hugging Face classifier, written in the formats people load it with.

Two formats, each loadable with transformers and peft alone (no fedgen), offline:

``"merged"``
    One standalone transformers model: the LoRA products merged into the base weights
    (for a full fine-tune, simply the model), the checkpoint's tokenizer, and
    ``id2label``/``label2id`` from the run's labels::

        model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)

``"adapters"`` (LoRA and FFA-LoRA runs)
    peft's own adapter format (``adapter_config.json``, ``adapter_model.safetensors``),
    holding the LoRA factors and the trained classification head, with the base's
    tokenizer beside them. It is loaded onto one's own copy of the same base::

        base = AutoModelForSequenceClassification.from_pretrained(
            BASE_FOLDER, num_labels=len(labels), local_files_only=True)
        model = PeftModel.from_pretrained(base, folder)

    peft's format holds no class names: pass ``id2label`` when loading the base (the
    caller records the run's labels beside the adapter).

    The base is named by its digest, never by a path of the machine that exported it:
    ``base_model_name_or_path`` is ``"sha256:<base digest>"`` (`fedgen.hf.checkpoint.base_digest`),
    which identifies the checkpoint exactly; the loader supplies its own folder. Classifier
    weights that the base checkpoint lacks and the run therefore initialised from its seed
    (BERT's pooler, for one) travel in the adapter too (as peft ``modules_to_save``), so
    the reloaded model does not draw them afresh.

Either way the tokenizer is the checkpoint's own: for DNABERT-style vocabularies it reads
sequences written as space-separated overlapping k-mers (`fedgen.hf.tokenizer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from torch import nn

from fedgen.errors import InputError
from fedgen.model_config import HFModelConfig
from fedgen.model_source import LocalBase, build_classifier
from fedgen.params import load_trainable

from .tokenizer import HFSequenceTokenizer

RELEASE_FORMATS = ("adapters", "merged")
_ADAPTER = "default"  # peft's name for the one adapter fedgen trains


class HFReleaseError(InputError):
    """A release that cannot be written as asked: the format, the labels, the round's tensors."""


def base_reference(config: HFModelConfig) -> str:
    """What a release names its base by: the base digest, not a local path."""
    return f"sha256:{config.base_digest}"


def write_hf_release(
    folder: Path,
    config: HFModelConfig,
    base: LocalBase,
    arrays: Mapping[str, np.ndarray],
    labels: list[str],
    fmt: str,
) -> None:
    """Write a round's classifier into the existing empty ``folder`` in format ``fmt``.

    The caller stages ``folder`` (writes it beside its destination and renames it once
    complete); nothing here is written unless every check passed.

    Parameters
    ----------
    folder : Path
        An existing, empty folder.
    config : HFModelConfig
        The run's model config.
    base : LocalBase
        This side's copy of the run's base checkpoint.
    arrays : Mapping[str, numpy.ndarray]
        The round's trainable tensors, named as the classifier's parameters.
    labels : list of str
        The class names, index ``i`` naming logit ``i``.
    fmt : {"adapters", "merged"}
        See the module docstring.

    Raises
    ------
    HFReleaseError
        If ``fmt`` is unknown, ``"adapters"`` is asked of a full fine-tune, the labels do
        not match the run's classes, ``folder`` is not an empty folder, or ``arrays`` do
        not fit the classifier.
    BaseModelMismatch
        If ``base`` is not the checkpoint the run is pinned to.
    """
    _check_request(folder, config, labels, fmt)
    classifier = build_classifier(config, base)
    try:
        load_trainable(classifier, arrays)
    except ValueError as exc:
        raise HFReleaseError(f"the round's tensors do not fit the run's {config.architecture}: {exc}") from None
    classifier.eval()
    model = classifier.model
    if fmt == "adapters":
        _save_adapters(folder, model, config)
    else:
        merged = model.merge_and_unload() if config.finetune != "full" else model
        _save_merged(folder, merged, config, labels)
    HFSequenceTokenizer(base.folder).tokenizer.save_pretrained(str(folder))


def _check_request(folder: Path, config: HFModelConfig, labels: list[str], fmt: str) -> None:
    if fmt not in RELEASE_FORMATS:
        raise HFReleaseError(f"unknown release format {fmt!r}; choose one of {', '.join(RELEASE_FORMATS)}")
    if fmt == "adapters" and config.finetune == "full":
        raise HFReleaseError(
            "format 'adapters' needs a LoRA or FFA-LoRA run; this run fine-tuned every weight (finetune = 'full'): "
            "export it as 'merged'"
        )
    if len(labels) != config.num_labels or len(set(labels)) != len(labels):
        raise HFReleaseError(
            f"labels {labels}: the run's classifier has {config.num_labels} classes, which need as many distinct names"
        )
    if not folder.is_dir() or any(folder.iterdir()):
        raise HFReleaseError(f"{folder}: not an empty folder")


def _save_merged(folder: Path, model: nn.Module, config: HFModelConfig, labels: list[str]) -> None:
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    _name_base(model, config)
    model.save_pretrained(str(folder), safe_serialization=True)


def _save_adapters(folder: Path, model: nn.Module, config: HFModelConfig) -> None:
    # Modules the base checkpoint lacks (BERT's pooler) already train, and save, with the
    # head (`fedgen.hf.classifier.apply_finetuning`), so the reload does not draw them anew.
    _name_base(model.get_base_model(), config)
    model.peft_config[_ADAPTER].base_model_name_or_path = base_reference(config)
    # False: peft's "auto" looks the base up on the Hugging Face hub when it is not a local folder.
    model.save_pretrained(str(folder), save_embedding_layers=False)


def _name_base(model: nn.Module, config: HFModelConfig) -> None:
    """Replace the local folder transformers remembers as the model's origin (it would land
    in ``config.json`` and peft's model card) by the base digest."""
    model.config._name_or_path = base_reference(config)
    model.name_or_path = base_reference(config)
