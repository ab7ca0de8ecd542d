"""Hugging Face checkpoints as a site's base: offline loading, the pinned digest, LoRA
through peft, only adapters travelling, a frozen base, and the per-sample gradient check."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fedgen.client.dp_check import PerSampleGradientMismatch, check_per_sample_gradients
from fedgen.client.round import train_round
from fedgen.client.trainer import DPSettings, LocalPlan, train_local
from fedgen.config import SiteConfig, TrainingConfig, load_toml
from fedgen.data import load_bundled
from fedgen.errors import InputError
from fedgen.hf.checkpoint import CheckpointError, base_digest, read_checkpoint
from fedgen.hf.classifier import load_sequence_classifier
from fedgen.hf.random import any_architecture_checkpoint
from fedgen.model_config import HFModelConfig, model_config_from_json
from fedgen.model_source import (
    BaseModelMismatch,
    LocalBase,
    build_classifier,
    model_summary,
    resolve_model_config,
    sequence_encoder,
)
from fedgen.params import record_to_arrays
from fedgen.protocol import ARRAYS_KEY

from ..conftest import model_message, write_site

SEQUENCES = ["ACGTTGCAACGGTACCATGCAGT" * 4, "TTGACA" * 5, "GGGCCCATATNACGT" * 3]


def _config(folder, finetune="lora", **options) -> HFModelConfig:
    return resolve_model_config(str(folder), TrainingConfig(finetune=finetune, **options), num_labels=2, max_bases=120)


def _hf_site(tmp_path, base, **fields) -> SiteConfig:
    toml = write_site(tmp_path / "site-a", n=48)
    site = load_toml(toml, SiteConfig)
    return site.model_copy(update={"base_model": base, **fields})


def test_base_digest_covers_weights_tokenizer_and_config(hf_bases, tmp_path):
    esm = hf_bases["esm"]
    digest = base_digest(read_checkpoint(esm))
    assert digest == base_digest(read_checkpoint(shutil.copytree(esm, tmp_path / "copy")))  # a copy is the same base
    assert digest != base_digest(read_checkpoint(hf_bases["esm-other"]))  # other weights
    vocab = shutil.copytree(esm, tmp_path / "vocab")
    (vocab / "vocab.txt").write_text((esm / "vocab.txt").read_text().replace("ACGTAC\n", "ACGTAX\n"))
    assert base_digest(read_checkpoint(vocab)) != digest  # another tokenizer


def test_bad_model_folders_are_refused_naming_the_cause(hf_bases, tmp_path):
    with pytest.raises(InputError, match="neither a built-in preset"):
        resolve_model_config(str(tmp_path / "nowhere"), TrainingConfig(), num_labels=2, max_bases=10)
    broken = shutil.copytree(hf_bases["esm"], tmp_path / "broken")
    (broken / "config.json").write_text('{"model_type": "esm",\n oops}')
    with pytest.raises(CheckpointError, match=r"config.json: line 2: not valid JSON"):
        read_checkpoint(broken)
    weightless = shutil.copytree(hf_bases["esm"], tmp_path / "weightless")
    (weightless / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weight file"):
        read_checkpoint(weightless)
    with pytest.raises(InputError, match="needs a pretrained base"):
        resolve_model_config("nano", TrainingConfig(finetune="lora"), num_labels=2, max_bases=10)


@pytest.mark.parametrize(
    "architecture, targets, kmer", [("esm", ("query", "value"), None), ("bert", ("query", "value"), 6)]
)
def test_architectures_load_offline_with_lora_on_their_real_modules(hf_bases, architecture, targets, kmer):
    config = _config(hf_bases[architecture])
    assert config.target_modules == targets
    assert config.architecture == f"{architecture.capitalize()}ForSequenceClassification"
    assert 0 < config.trainable_parameters < config.total_parameters / 10
    assert model_config_from_json(config.to_json()) == config
    encoder = sequence_encoder(config, "", LocalBase(hf_bases[architecture]))
    assert encoder.kmer == kmer  # DNABERT-style vocabularies get overlapping k-mers, ESM splits raw DNA
    ids = encoder.encode(SEQUENCES, max_length=config.max_len)
    assert ids.shape == (3, config.max_len)
    assert (ids != encoder.tokenizer.unk_token_id).all() or architecture == "bert"
    model = build_classifier(config, LocalBase(hf_bases[architecture]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name or ".modules_to_save." in name for name in trainable)
    assert model(ids).shape == (3, 2)
    summary = model_summary(config, str(hf_bases[architecture]))
    assert summary["base_digest"] == base_digest(read_checkpoint(hf_bases[architecture]))
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_ffa_lora_freezes_a_halves_the_update_and_pins_a(hf_bases):
    lora, ffa = _config(hf_bases["esm"]), _config(hf_bases["esm"], finetune="ffa-lora")
    model = build_classifier(ffa, LocalBase(hf_bases["esm"]))
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any(".lora_A." in name for name in names) and any(".lora_B." in name for name in names)
    head = sum(p.numel() for n, p in model.named_parameters() if ".modules_to_save." in n)
    assert ffa.trainable_parameters - head == (lora.trainable_parameters - head) // 2
    assert ffa.frozen_digest is not None
    # Every side rebuilds the same frozen A from the run's seed; another seed is refused.
    with pytest.raises(BaseModelMismatch, match="frozen LoRA A"):
        build_classifier(HFModelConfig(**{**json.loads(ffa.to_json()), "seed": 7}), LocalBase(hf_bases["esm"]))


@pytest.mark.parametrize(
    "architecture, finetune", [("esm", "lora"), ("bert", "lora"), ("esm", "ffa-lora"), ("esm", "full")]
)
def test_dp_training_leaves_the_frozen_base_bit_identical(hf_bases, architecture, finetune):
    folder = hf_bases[architecture]
    config = _config(folder, finetune=finetune)
    model = build_classifier(config, LocalBase(folder))
    fresh = dict(load_sequence_classifier(read_checkpoint(folder), 2).named_parameters())
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    data = load_bundled("train")
    ids = sequence_encoder(config, "", LocalBase(folder)).encode(data.sequences[:64], max_length=config.max_len)
    labels = torch.tensor(data.labels[:64])
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_local(
        model,
        ids,
        labels,
        LocalPlan(steps=2, batch_size=16, learning_rate=1e-2, seed=0),
        torch.device("cpu"),
        DPSettings(1.0, 1.0, "rdp", [], "ew"),
    )
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], before) for n, before in trained_before.items())  # it did train
    matched = 0
    for name, before in frozen.items():
        assert torch.equal(after[name], before), name
        plain = name.removeprefix("model.").removeprefix("base_model.model.").replace(".base_layer", "")
        if plain in fresh:  # the very weights of the checkpoint file, not just unchanged in memory
            assert torch.equal(after[name], fresh[plain]), name
            matched += 1
    assert frozen and matched > 0.5 * len(frozen)  # (full: ESM's contact head, which classification never uses)


def test_a_site_sends_only_adapter_and_head_tensors(hf_bases, tmp_path):
    folder = hf_bases["esm"]
    config = _config(folder)
    server_model = build_classifier(config, LocalBase(folder))
    message = model_message(config, server_model)
    sent = set(record_to_arrays(message[ARRAYS_KEY]))
    reply = train_round(_hf_site(tmp_path, folder), message, run_id=1)
    returned = record_to_arrays(reply[ARRAYS_KEY])
    assert set(returned) == sent == {n for n, p in server_model.named_parameters() if p.requires_grad}
    assert all(".lora_" in name or ".modules_to_save." in name for name in returned)
    assert sum(a.size for a in returned.values()) == config.trainable_parameters
    # The per-sample gradient check ran before the budget was spent, and is cached.
    checks = json.loads((tmp_path / "site-a" / "state" / "gradient-checks.json").read_text())["checks"]
    assert [entry["result"]["passed"] for entry in checks.values()] == [True]


def test_a_site_with_another_base_refuses_the_round_before_spending_budget(hf_bases, tmp_path):
    config = _config(hf_bases["esm"])
    message = model_message(config, build_classifier(config, LocalBase(hf_bases["esm"])))
    site = _hf_site(tmp_path, hf_bases["esm-other"])
    with pytest.raises(BaseModelMismatch, match="pinned to") as refused:
        train_round(site, message, run_id=1)
    assert str(hf_bases["esm-other"]) not in str(refused.value)  # the reason leaves the site: no path
    assert not (site.state_dir / "privacy-ledger.json").exists()
    without = _hf_site(tmp_path / "b", None)
    with pytest.raises(InputError, match="base_model"):
        train_round(without, message, run_id=1)


def test_remote_code_needs_the_sites_opt_in_and_a_sample_mixing_model_gets_no_dp(hf_bases, tmp_path):
    folder = hf_bases["mixing"]
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        resolve_model_config(str(folder), TrainingConfig(), num_labels=2, max_bases=60)
    config = resolve_model_config(str(folder), TrainingConfig(trust_remote_code=True), num_labels=2, max_bases=60)
    assert config.code_digest is not None and config.target_modules == ("query", "value")
    model = build_classifier(config, LocalBase(folder, trust_remote_code=True))
    message = model_message(config, model)
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        train_round(_hf_site(tmp_path / "no", folder), message, run_id=1)
    site = _hf_site(tmp_path / "yes", folder, trust_remote_code=True)
    with pytest.raises(PerSampleGradientMismatch, match="do not match an explicit per-sample loop"):
        train_round(site, message, run_id=1)
    assert not (site.state_dir / "privacy-ledger.json").exists()  # refused before any budget was spent
    # Without DP there is no per-sample claim to check: the site may train it.
    plain = site.model_copy(update={"privacy": site.privacy.model_copy(update={"enabled": False})})
    reply = train_round(plain, message, run_id=1)
    assert set(record_to_arrays(reply[ARRAYS_KEY])) == set(record_to_arrays(message[ARRAYS_KEY]))


def test_reduced_precision_is_refused_under_dp_and_trains_without(hf_bases, tmp_path):
    folder = hf_bases["esm"]
    config = _config(folder)
    message = model_message(config, build_classifier(config, LocalBase(folder)))
    site = _hf_site(tmp_path, folder, precision="bf16")
    with pytest.raises(InputError, match="refused under DP"):
        train_round(site, message, run_id=1)
    plain = site.model_copy(update={"privacy": site.privacy.model_copy(update={"enabled": False})})
    reply = train_round(plain, message, run_id=1)
    assert all(np.isfinite(a).all() for a in record_to_arrays(reply[ARRAYS_KEY]).values())


def _check(folder, finetune):
    config = _config(folder, finetune=finetune)
    model = build_classifier(config, LocalBase(folder), deterministic=True)
    data = load_bundled("train")
    ids = sequence_encoder(config, "", LocalBase(folder)).encode(data.sequences[:6], max_length=config.max_len)
    ids[1, 20:] = ids[0, -1]  # rows of different real lengths: padding is where sampling goes wrong
    return check_per_sample_gradients(model, ids, torch.tensor(data.labels[:6]))


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("architecture", ["esm", "bert"])
def test_per_sample_gradients_of_the_real_architectures_pass_the_check(hf_bases, architecture, finetune):
    # Full fine-tuning includes attention key biases, whose true gradient is zero: they are
    # compared against the sample's whole gradient, not against their own rounding noise.
    check = _check(hf_bases[architecture], finetune)
    assert check.passed, check.reason
    assert check.max_relative_error < 1e-4


@pytest.mark.parametrize("model_type, targets", [("roberta", ("query", "value")), ("distilbert", ("q_lin", "v_lin"))])
def test_other_architectures_are_attempted_with_their_own_module_names(tmp_path, model_type, targets):
    folder = any_architecture_checkpoint(tmp_path / model_type, model_type)
    config = _config(folder)
    assert config.target_modules == targets
    assert _check(folder, "lora").passed
    reply = train_round(
        _hf_site(tmp_path, folder), model_message(config, build_classifier(config, LocalBase(folder))), 1
    )
    assert all(".lora_" in n or ".modules_to_save." in n for n in record_to_arrays(reply[ARRAYS_KEY]))


def test_a_run_toml_names_its_checkpoint_relative_to_itself_and_the_plan_reads_back(hf_bases, tmp_path, monkeypatch):
    from fedgen.cli.demo import write_consortium
    from fedgen.client.supernode import check_site
    from fedgen.config import ConfigError, RunConfig
    from fedgen.server.coordinator import plan_run
    from fedgen.server.plan import read_plan, write_plan

    root = tmp_path / "consortium"
    shutil.copytree(hf_bases["esm"], root / "bases" / "nt")
    _, site_tomls, run_toml = write_consortium(
        root, sites=1, rounds=1, epsilon=8.0, seed=0, training=TrainingConfig(model=str(root / "bases" / "nt"))
    )
    text = run_toml.read_text()
    assert str(root / "bases" / "nt") in text
    run_toml.write_text(text.replace(json.dumps(str(root / "bases" / "nt")), '"bases/nt"'))  # as an operator writes it
    monkeypatch.chdir(tmp_path)  # elsewhere
    _, plan = plan_run(load_toml(run_toml, RunConfig), str(run_toml))
    assert plan.base_model == root / "bases" / "nt"
    assert isinstance(plan.model, HFModelConfig) and plan.model.base_digest == base_digest(
        read_checkpoint(root / "bases" / "nt")
    )
    write_plan(plan, tmp_path / "plan.json")
    assert read_plan(tmp_path / "plan.json") == plan  # the ServerApp reads the same HF model config back

    site = load_toml(site_tomls[0], SiteConfig)
    assert site.base_model == root / "bases" / "nt"
    check_site(site, str(site_tomls[0]))
    with pytest.raises(ConfigError, match=r"site.toml: base_model: .*no config.json"):
        check_site(site.model_copy(update={"base_model": tmp_path}), str(site_tomls[0]))
