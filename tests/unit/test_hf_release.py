"""A round's Hugging Face classifier, released as peft adapters or as a merged transformers
model, reloads with transformers/peft alone and predicts what fedgen's classifier predicts.

Real transformers and peft on tiny random ESM (Nucleotide Transformer shape) and BERT
(DNABERT shape) checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedgen.config import TrainingConfig
from fedgen.errors import InputError
from fedgen.hf.random import bert_checkpoint, esm_checkpoint
from fedgen.hf.release import HFReleaseError, base_reference, write_hf_release
from fedgen.model_source import BaseModelMismatch, LocalBase, build_classifier, resolve_model_config, sequence_encoder
from fedgen.params import load_trainable

LABELS = ["promoter", "background"]
SEQUENCES = ["ACGTACGTTGCAACGGTACCATGCAAGT", "TTGACA", "GGGCCCAATTTACGATCGATCGTAGCTAGCTTT"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "esm": esm_checkpoint(root / "esm"),
        "bert": bert_checkpoint(root / "bert"),
        "esm-other": esm_checkpoint(root / "esm-other", seed=1),
    }


def _config(folder: Path, finetune: str):
    return resolve_model_config(str(folder), TrainingConfig(finetune=finetune), num_labels=len(LABELS), max_bases=40)


def _round_tensors(config, folder: Path) -> dict[str, np.ndarray]:
    """Trainable tensors far from their initialisation (B factors non-zero, head moved)."""
    model = build_classifier(config, LocalBase(folder))
    rng = np.random.default_rng(7)
    return {
        name: (p.detach().numpy() + rng.normal(0.0, 0.2, size=p.shape)).astype(np.float32)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def _fedgen_logits(config, folder: Path, arrays, ids: torch.Tensor) -> torch.Tensor:
    model = build_classifier(config, LocalBase(folder))
    load_trainable(model, arrays)
    model.eval()
    with torch.no_grad():
        return model(ids)


def _transformers_logits(model, ids: torch.Tensor, pad_id: int, model_type: str) -> torch.Tensor:
    """A plain transformers call, with the inputs fedgen's classifier passes."""
    kwargs = {"input_ids": ids, "attention_mask": (ids != pad_id).long()}
    if model_type == "bert":
        kwargs["token_type_ids"] = torch.zeros_like(ids)
        kwargs["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids).contiguous()
    model.eval()
    with torch.no_grad():
        return model(**kwargs).logits


def _no_local_path(release: Path, base: Path) -> None:
    for path in release.iterdir():
        assert str(base).encode() not in path.read_bytes(), f"{path.name} names the exporting machine's base folder"


CASES = [("esm", "lora"), ("esm", "ffa-lora"), ("bert", "lora"), ("bert", "full")]


@pytest.mark.parametrize(("arch", "finetune"), CASES)
def test_release_reloads_with_transformers_and_predicts_the_same(arch, finetune, bases, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = bases[arch]
    config = _config(folder, finetune)
    arrays = _round_tensors(config, folder)
    encoder = sequence_encoder(config, "", LocalBase(folder))
    ids = encoder.encode(SEQUENCES, max_length=config.max_len)
    expected = _fedgen_logits(config, folder, arrays, ids)
    initial = build_classifier(config, LocalBase(folder)).eval()
    with torch.no_grad():
        assert not torch.allclose(initial(ids), expected, atol=1e-3), "the round's tensors must change the predictions"

    merged = tmp_path / "merged"
    merged.mkdir()
    write_hf_release(merged, config, LocalBase(folder), arrays, LABELS, "merged")
    model = AutoModelForSequenceClassification.from_pretrained(str(merged), local_files_only=True)
    assert not any("lora" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(_transformers_logits(model, ids, encoder.pad_id, arch), expected, atol=1e-5, rtol=1e-5)
    assert model.config.id2label == dict(enumerate(LABELS))
    assert model.config.label2id == {label: i for i, label in enumerate(LABELS)}
    tokenizer = AutoTokenizer.from_pretrained(str(merged), local_files_only=True)
    assert tokenizer.get_vocab() == encoder.tokenizer.get_vocab()
    _no_local_path(merged, folder)

    if finetune == "full":
        return
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    write_hf_release(adapters, config, LocalBase(folder), arrays, LABELS, "adapters")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= {
        p.name for p in adapters.iterdir()
    }
    adapter_config = json.loads((adapters / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == base_reference(config)
    _no_local_path(adapters, folder)
    # A seed other than the run's: whatever the base lacks must come from the adapter, not the RNG.
    torch.manual_seed(config.seed + 1)
    base = AutoModelForSequenceClassification.from_pretrained(
        str(folder), num_labels=len(LABELS), local_files_only=True
    )
    reloaded = PeftModel.from_pretrained(base, str(adapters))
    torch.testing.assert_close(
        _transformers_logits(reloaded, ids, encoder.pad_id, arch), expected, atol=1e-5, rtol=1e-5
    )


def test_adapters_are_refused_for_a_full_fine_tune(bases, tmp_path):
    config = _config(bases["bert"], "full")
    with pytest.raises(HFReleaseError, match="adapters.*finetune = 'full'.*merged") as caught:
        write_hf_release(tmp_path, config, LocalBase(bases["bert"]), {}, LABELS, "adapters")
    assert isinstance(caught.value, InputError)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["onnx", "", "Merged"])
def test_an_unknown_format_is_refused(fmt, bases, tmp_path):
    config = _config(bases["esm"], "lora")
    with pytest.raises(HFReleaseError, match="unknown release format.*adapters, merged"):
        write_hf_release(tmp_path, config, LocalBase(bases["esm"]), {}, LABELS, fmt)
    assert not any(tmp_path.iterdir())


def test_labels_must_name_every_class_once(bases, tmp_path):
    config = _config(bases["esm"], "lora")
    arrays = _round_tensors(config, bases["esm"])
    for labels in (["only"], ["same", "same"]):
        with pytest.raises(HFReleaseError, match="2 classes"):
            write_hf_release(tmp_path, config, LocalBase(bases["esm"]), arrays, labels, "merged")
    assert not any(tmp_path.iterdir())


def test_tensors_of_another_model_are_refused(bases, tmp_path):
    config = _config(bases["esm"], "lora")
    arrays = _round_tensors(_config(bases["esm"], "ffa-lora"), bases["esm"])  # no A factors
    with pytest.raises(HFReleaseError, match="do not fit.*missing"):
        write_hf_release(tmp_path, config, LocalBase(bases["esm"]), arrays, LABELS, "adapters")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["adapters", "merged"])
def test_a_base_with_another_digest_is_refused(fmt, bases, tmp_path):
    config = _config(bases["esm"], "lora")
    arrays = _round_tensors(config, bases["esm"])
    with pytest.raises(BaseModelMismatch, match="different checkpoint"):
        write_hf_release(tmp_path, config, LocalBase(bases["esm-other"]), arrays, LABELS, fmt)
    assert not any(tmp_path.iterdir())


def test_the_folder_must_be_empty(bases, tmp_path):
    config = _config(bases["esm"], "lora")
    (tmp_path / "old").write_text("x")
    with pytest.raises(HFReleaseError, match="not an empty folder"):
        write_hf_release(tmp_path, config, LocalBase(bases["esm"]), {}, LABELS, "merged")
