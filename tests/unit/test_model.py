import dataclasses
import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fedgen.data import load_bundled
from fedgen.model import (
    PRESETS,
    ModelConfig,
    build_model,
    count_parameters,
    evaluate_classifier,
    mask_tokens,
    preset_config,
    resolve_device,
)
from fedgen.params import digest, to_numpy, trainable_tensors
from fedgen.tokenizers import make_tokenizer


def _config(**overrides) -> ModelConfig:
    return dataclasses.replace(preset_config("nano", vocab_size=260, max_len=24), **overrides)


def _ids(batch=4, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (batch, length), generator=g)
    ids[:, 0] = 1  # CLS
    return ids


def test_presets_span_test_size_to_about_100m_parameters():
    counts = {
        name: count_parameters(build_model(preset_config(name, vocab_size=261, max_len=512)))
        for name in ("nano", "large")
    }
    assert counts["nano"] < 50_000
    assert 90_000_000 < counts["large"] < 110_000_000
    assert list(PRESETS)[0] == "nano" and list(PRESETS)[-1] == "large"


def test_initialisation_is_deterministic_for_a_seed():
    a = digest(to_numpy(trainable_tensors(build_model(_config(), seed=3))))
    b = digest(to_numpy(trainable_tensors(build_model(_config(), seed=3))))
    c = digest(to_numpy(trainable_tensors(build_model(_config(), seed=4))))
    assert a == b != c


def test_build_model_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(_config(), seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_classifier_and_mlm_output_shapes():
    ids = _ids()
    assert build_model(_config(num_labels=3))(ids).shape == (4, 3)
    assert build_model(_config(), task="mlm")(ids).shape == (4, 20, 260)


def test_padding_does_not_change_classifier_output():
    model = build_model(_config()).eval()
    ids = _ids(batch=2, length=10)
    padded = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(ids), model(padded), atol=1e-5, rtol=1e-5)


def test_rejects_sequences_longer_than_the_position_table():
    with pytest.raises(ValueError, match="exceeds max_len"):
        build_model(_config())(_ids(length=30))


def test_bad_config_and_unknown_preset_or_task():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(vocab_size=10, max_len=5, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_config("huge", vocab_size=10, max_len=5)
    with pytest.raises(ValueError, match="unknown task"):
        build_model(_config(), task="regression")


def test_config_json_round_trip():
    cfg = _config(num_labels=5)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_only_opacus_supported_layers():
    assert ModuleValidator.validate(build_model(_config()), strict=False) == []


def test_opacus_per_sample_gradients_match_an_explicit_loop():
    torch.manual_seed(0)
    model = build_model(_config(dropout=0.0)).double()
    ids = _ids(batch=3, length=12)
    ids[1, 8:] = 0  # padding in one sample
    labels = torch.tensor([0, 1, 1])
    gsm = GradSampleModule(model, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(ids), labels, reduction="sum").backward()
    for i in range(3):
        reference = build_model(_config(dropout=0.0)).double()
        reference.load_state_dict(model.state_dict())
        torch.nn.functional.cross_entropy(reference(ids[i : i + 1]), labels[i : i + 1], reduction="sum").backward()
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(p.grad_sample[i], q.grad, atol=1e-10, rtol=1e-8, msg=name)


def test_mask_tokens_never_masks_cls_or_padding():
    tok = make_tokenizer("nucleotide")
    ids = tok.encode(["ACGTACGTACGTACGT", "ACGT"])
    g = torch.Generator().manual_seed(0)
    inputs, labels = mask_tokens(
        ids,
        mask_id=tok.mask_id,
        pad_id=tok.pad_id,
        cls_id=tok.cls_id,
        vocab_size=tok.vocab_size,
        num_special=4,
        probability=0.9,
        generator=g,
    )
    special = (ids == tok.pad_id) | (ids == tok.cls_id)
    assert torch.all(labels[special] == -100)
    assert torch.equal(inputs[special], ids[special])
    assert (labels != -100).sum() > 0
    assert torch.equal(labels[labels != -100], ids[labels != -100])


def test_evaluate_classifier_counts_correct_predictions():
    model = build_model(_config()).eval()
    ids = _ids(batch=6)
    predicted = model(ids).argmax(-1)
    loss, accuracy = evaluate_classifier(model, ids, predicted, torch.device("cpu"), batch_size=4)
    assert accuracy == 1.0 and loss > 0
    _, wrong = evaluate_classifier(model, ids, 1 - predicted, torch.device("cpu"))
    assert wrong == 0.0


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_a_cuda_device_the_site_lacks_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(RuntimeError, match=f"device '{name}' requested but CUDA is not available on this site"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(RuntimeError, match="device 'cuda:2' requested but only 2 CUDA devices exist"):
        resolve_device("cuda:2")


# Every device this machine has: the CPU everywhere, the GPU where there is one.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("name", DEVICES)
def test_the_model_runs_on_the_requested_device(name):
    device = resolve_device(name)
    assert device.type == name
    model = build_model(_config())
    ids = _ids(batch=6)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    evaluate_classifier(model, ids, labels, device, batch_size=4)
    assert {p.device.type for p in model.parameters()} == {name}  # moved there, every tensor
    assert model(ids.to(device)).device.type == name


def test_masked_lm_learns_to_fill_in_masked_bases():
    """A few masked-LM steps on real promoter sequences: the loss, taken on masked positions only,
    falls from chance over the vocabulary to below chance over the four bases, and held-out masked
    bases are predicted better than by always guessing the commonest base."""
    tok = make_tokenizer("nucleotide")
    data = load_bundled("train")
    train_ids, held_out_ids = tok.encode(data.sequences[:32]), tok.encode(data.sequences[64:128])
    model = build_model(
        dataclasses.replace(preset_config("nano", vocab_size=tok.vocab_size, max_len=train_ids.shape[1]), dropout=0.0),
        task="mlm",
    )

    def masked(ids, seed):
        return mask_tokens(
            ids,
            mask_id=tok.mask_id,
            pad_id=tok.pad_id,
            cls_id=tok.cls_id,
            vocab_size=tok.vocab_size,
            num_special=4,
            generator=torch.Generator().manual_seed(seed),
        )

    def masked_loss(inputs, labels):  # labels are -100 wherever nothing was masked
        return torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), labels.flatten(), ignore_index=-100)

    held_inputs, held_labels = masked(held_out_ids, seed=999)
    targets = held_labels != -100
    bases = (held_out_ids != tok.pad_id) & (held_out_ids != tok.cls_id)
    assert targets.sum() / bases.sum() == pytest.approx(0.15, abs=0.02)  # the loss sees ~15% of the bases
    assert (held_inputs[targets] == tok.mask_id).float().mean() == pytest.approx(0.8, abs=0.05)
    assert torch.equal(held_inputs[~targets], held_out_ids[~targets])  # nothing else is altered
    with torch.no_grad():
        before = masked_loss(held_inputs, held_labels).item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(40):
        optimizer.zero_grad()
        masked_loss(*masked(train_ids, seed=step)).backward()
        optimizer.step()
    with torch.no_grad():
        after = masked_loss(held_inputs, held_labels).item()
        predicted = model(held_inputs).argmax(-1)
    assert before == pytest.approx(math.log(tok.vocab_size), abs=0.1)  # untrained: uniform over the vocabulary
    assert after < math.log(4)  # better than uniform over A, C, G, T
    accuracy = (predicted[targets] == held_labels[targets]).float().mean().item()
    commonest = torch.bincount(held_labels[targets]).max().item() / targets.sum().item()
    assert accuracy > commonest + 0.05
