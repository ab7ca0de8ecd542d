"""The per-sample gradient check, with real Opacus on real models and real sequences."""

import dataclasses
import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedgen.client.dp_check import (
    CheckKey,
    GradientCheck,
    GradientCheckCache,
    PerSampleGradientMismatch,
    check_per_sample_gradients,
    ensure_per_sample_gradients,
    select_samples,
    verified_grad_sample_mode,
)
from fedgen.data import load_bundled
from fedgen.errors import FedgenError
from fedgen.model import build_model, preset_config
from fedgen.state_files import GRADIENT_CHECKS_FILE
from fedgen.tokenizers import make_tokenizer

KEY = CheckKey(base_digest="sha256:" + "ab" * 32, trainable="full nano")


@pytest.fixture(scope="module")
def batch():
    """Eight real promoter sequences cut to different lengths, so rows carry different padding."""
    data = load_bundled("train").subset(range(8))
    tokenizer = make_tokenizer("kmer3s1")
    cfg = preset_config("nano", vocab_size=tokenizer.vocab_size, max_len=tokenizer.token_length(70))
    ids = tokenizer.encode([sequence[: 20 + 7 * i] for i, sequence in enumerate(data.sequences)])
    return dataclasses.replace(cfg, dropout=0.0), ids, torch.tensor(data.labels)


class BatchCrossTalk(nn.Module):
    """A classifier whose forward leaks the batch into each sample (half the batch mean is
    subtracted from every hidden state, BatchNorm-style): per-sample gradients are wrong."""

    def __init__(self, vocab_size: int, pad_id: int) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.tokens = nn.Embedding(vocab_size, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        real = (ids != self.pad_id).unsqueeze(-1).float()
        hidden = self.mix(self.tokens(ids))
        hidden = hidden - 0.5 * (hidden * real).sum((0, 1)) / real.sum((0, 1))
        return self.head((hidden * real).sum(1) / real.sum(1))


class CountingClassifier(nn.Module):
    """Counts its forward calls across deep copies (the check works on copies)."""

    calls = 0

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return self.inner(ids)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost"])
def test_builtin_model_passes_in_every_grad_sample_mode(batch, mode):
    cfg, ids, labels = batch
    model = build_model(cfg)
    check = check_per_sample_gradients(model, ids[:4], labels[:4], grad_sample_mode=mode)
    assert check.passed, check.reason
    assert check.max_relative_error < 1e-4
    assert check.worst_tensor in dict(model.named_parameters())
    assert check.samples == 4 and check.worst_tensor in check.reason


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_model_that_mixes_samples_fails_naming_the_worst_tensor(batch, mode):
    cfg, ids, labels = batch
    torch.manual_seed(0)
    model = BatchCrossTalk(cfg.vocab_size, cfg.pad_id)
    check = check_per_sample_gradients(model, ids[:4], labels[:4], grad_sample_mode=mode)
    assert not check.passed
    assert check.max_relative_error > 0.1
    assert check.worst_tensor in dict(model.named_parameters())
    assert check.worst_tensor in check.reason and "do not match" in check.reason


def test_a_layer_opacus_refuses_is_a_failed_check_with_its_reason(batch):
    cfg, ids, labels = batch
    width = 8 * ids.shape[1]
    model = nn.Sequential(nn.Embedding(cfg.vocab_size, 8), nn.Flatten(), nn.BatchNorm1d(width), nn.Linear(width, 2))
    check = check_per_sample_gradients(model, ids[:4], labels[:4])
    assert not check.passed and check.worst_tensor is None and math.isinf(check.max_relative_error)
    assert check.reason.startswith("Opacus refuses a layer") and "BatchNorm" in check.reason
    assert "\n" not in check.reason


def test_dropout_left_on_is_named_as_the_cause(batch):
    cfg, ids, labels = batch
    check = check_per_sample_gradients(build_model(dataclasses.replace(cfg, dropout=0.3)), ids[:4], labels[:4])
    assert not check.passed and "dropout" in check.reason


def test_the_callers_model_is_left_as_it_was(batch):
    cfg, ids, labels = batch
    model = build_model(cfg).eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert check_per_sample_gradients(model, ids[:4], labels[:4], grad_sample_mode="hooks").passed
    assert check_per_sample_gradients(model, ids[:4], labels[:4], grad_sample_mode="ghost").passed
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    assert not model.training  # the check trained a copy, not this model
    for param in model.parameters():
        assert param.grad is None
        assert not any(hasattr(param, a) for a in ("grad_sample", "_forward_counter", "_norm_sample"))
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks and not module._backward_pre_hooks
        assert not hasattr(module, "activations") and not hasattr(module, "autograd_grad_sample_hooks")


def test_a_lora_model_passes_and_only_its_trainable_tensors_are_compared(batch):
    cfg, ids, labels = batch
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"])
    model = get_peft_model(build_model(cfg), lora)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "modules_to_save" in name for name in trainable)
    for mode in ("hooks", "functorch"):
        check = check_per_sample_gradients(model, ids[:4], labels[:4], grad_sample_mode=mode)
        assert check.passed, check.reason
        assert check.max_relative_error < 1e-4 and check.worst_tensor in trainable


def test_samples_are_chosen_with_different_real_lengths(batch):
    _, ids, _ = batch
    equal_first = torch.cat([ids[:1].repeat(3, 1), ids])  # three identical rows first
    chosen = select_samples(equal_first, 4)
    real_lengths = {int((row != 0).sum()) for row in equal_first[chosen]}
    assert len(chosen) == 4 and len(real_lengths) == 4
    same_length = ids[-1:].repeat(5, 1)
    assert select_samples(same_length, 4).tolist() == [0, 1, 2, 3]  # filled up when lengths cannot differ
    assert select_samples(ids[:2], 4).tolist() == [0, 1]


def test_a_check_survives_json_also_when_nothing_was_compared():
    refused = GradientCheck(passed=False, max_relative_error=math.inf, worst_tensor=None, samples=4, reason="r")
    assert GradientCheck.from_dict(json.loads(json.dumps(refused.to_dict(), allow_nan=False))) == refused


def test_a_passed_check_is_cached_per_key_mode_and_file(batch, tmp_path):
    cfg, ids, labels = batch
    model = CountingClassifier(build_model(cfg))
    CountingClassifier.calls = 0
    first = ensure_per_sample_gradients(model, ids, labels, state_dir=tmp_path, key=KEY)
    assert first.passed and first.samples == 4 and CountingClassifier.calls > 0
    stored = json.loads((tmp_path / GRADIENT_CHECKS_FILE).read_text())
    (entry,) = stored["checks"].values()
    assert entry["key"]["base_digest"] == KEY.base_digest and entry["key"]["grad_sample_mode"] == "hooks"
    assert entry["result"]["worst_tensor"] == first.worst_tensor

    ran = CountingClassifier.calls
    assert ensure_per_sample_gradients(model, ids, labels, state_dir=tmp_path, key=KEY) == first
    assert CountingClassifier.calls == ran  # answered from the file, the model never ran

    other_config = dataclasses.replace(KEY, trainable="lora r8 qkv")
    ensure_per_sample_gradients(model, ids, labels, state_dir=tmp_path, key=other_config)
    assert CountingClassifier.calls > ran
    ran = CountingClassifier.calls
    ensure_per_sample_gradients(model, ids, labels, state_dir=tmp_path, key=KEY, grad_sample_mode="ghost")
    assert CountingClassifier.calls > ran
    assert len(json.loads((tmp_path / GRADIENT_CHECKS_FILE).read_text())["checks"]) == 3


def test_a_corrupted_cache_file_means_checking_again(batch, tmp_path):
    cfg, ids, labels = batch
    model = CountingClassifier(build_model(cfg))
    ensure_per_sample_gradients(model, ids, labels, state_dir=tmp_path, key=KEY)
    cache_file = tmp_path / GRADIENT_CHECKS_FILE
    for damage in ('{"format": 1, "checks": {"x": ', '{"format": 1, "checks": []}', "[]", ""):
        cache_file.write_text(damage)
        CountingClassifier.calls = 0
        assert ensure_per_sample_gradients(model, ids, labels, state_dir=tmp_path, key=KEY).passed
        assert CountingClassifier.calls > 0
        assert GradientCheckCache(tmp_path).get(KEY, "hooks") is not None  # and the file is whole again
    # An entry whose result is malformed is a miss too.
    stored = json.loads(cache_file.read_text())
    next(iter(stored["checks"].values()))["result"]["passed"] = "yes"
    cache_file.write_text(json.dumps(stored))
    assert GradientCheckCache(tmp_path).get(KEY, "hooks") is None


def test_a_mismatch_refuses_training_and_is_refused_fast_next_time(batch, tmp_path):
    cfg, ids, labels = batch
    torch.manual_seed(0)
    model = CountingClassifier(BatchCrossTalk(cfg.vocab_size, cfg.pad_id))
    CountingClassifier.calls = 0
    with pytest.raises(PerSampleGradientMismatch) as refused:
        ensure_per_sample_gradients(model, ids, labels, state_dir=tmp_path, key=KEY)
    assert isinstance(refused.value, FedgenError)
    message = str(refused.value)
    assert "do not match an explicit per-sample loop (worst: inner.head.weight, relative error" in message
    assert message.endswith("refusing to train under DP")
    ran = CountingClassifier.calls
    with pytest.raises(PerSampleGradientMismatch, match="worst: inner.head.weight"):
        ensure_per_sample_gradients(model, ids, labels, state_dir=tmp_path, key=KEY)
    assert CountingClassifier.calls == ran


def test_a_refused_model_is_refused_with_opacus_reason(batch, tmp_path):
    cfg, ids, labels = batch
    width = 8 * ids.shape[1]
    model = nn.Sequential(nn.Embedding(cfg.vocab_size, 8), nn.Flatten(), nn.BatchNorm1d(width), nn.Linear(width, 2))
    with pytest.raises(PerSampleGradientMismatch, match="could not be verified .*BatchNorm"):
        ensure_per_sample_gradients(model, ids, labels, state_dir=tmp_path, key=KEY)
    cached = GradientCheckCache(tmp_path).get(KEY, "hooks")
    assert cached is not None and not cached.passed and math.isinf(cached.max_relative_error)


class RMSNormClassifier(nn.Module):
    """RMSNorm, as in recent language models: Opacus' hooks handle it, torch's expanded weights do not."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, 8)
        self.norm = nn.RMSNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.tokens(ids)).mean(1))


def test_the_site_trains_with_the_fastest_mode_its_model_passes(batch, tmp_path):
    cfg, ids, labels = batch
    built = []

    def build(factory):
        def make():
            built.append(factory)
            torch.manual_seed(0)
            return factory()

        return make

    assert verified_grad_sample_mode(build(lambda: build_model(cfg)), ids, labels, state_dir=tmp_path, key=KEY) == "ew"
    rms_key = dataclasses.replace(KEY, trainable="rmsnorm")
    rms = build(lambda: RMSNormClassifier(cfg.vocab_size))
    assert verified_grad_sample_mode(rms, ids, labels, state_dir=tmp_path, key=rms_key) == "hooks"
    assert len(built) == 2  # each model built once, however many modes were checked
    cache = GradientCheckCache(tmp_path)
    assert not cache.get(rms_key, "ew").passed and "Expanded Weights" in cache.get(rms_key, "ew").reason
    assert cache.get(rms_key, "hooks").passed
    assert verified_grad_sample_mode(rms, ids, labels, state_dir=tmp_path, key=rms_key) == "hooks"
    assert len(built) == 2  # both verdicts came from the cache
    leaky_key = dataclasses.replace(KEY, trainable="leaky")
    with pytest.raises(PerSampleGradientMismatch, match="ew: .*; hooks: .*do not match"):
        verified_grad_sample_mode(
            build(lambda: BatchCrossTalk(cfg.vocab_size, cfg.pad_id)), ids, labels, state_dir=tmp_path, key=leaky_key
        )
