"""Fine-tuning a Hugging Face checkpoint across sites: in simulation with each real
architecture, and in a real loopback deployment that never calls a hub."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from fedgen import pki
from fedgen.config import TrainingConfig
from fedgen.data import load_bundled
from fedgen.hf.checkpoint import base_digest, read_checkpoint
from fedgen.lineage import read_records
from fedgen.model_config import HFModelConfig
from fedgen.model_source import LocalBase, build_classifier, resolve_model_config, sequence_encoder
from fedgen.simulation import simulate

from .processes import processes_mentioning

pytestmark = pytest.mark.slow


def _checkpoint_names(path) -> set[str]:
    with safe_open(str(path), framework="numpy") as handle:
        return set(handle.keys())


def _travelling(folder, finetune: str, max_bases: int) -> set[str]:
    config = resolve_model_config(str(folder), TrainingConfig(finetune=finetune), num_labels=2, max_bases=max_bases)
    model = build_classifier(config, LocalBase(folder))
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_tripwire_catches_a_hub_call(tripwire):
    server, env = tripwire
    program = (
        "from huggingface_hub import hf_hub_download\ntry:\n"
        "    hf_hub_download('fedgen/absent', 'config.json')\nexcept Exception:\n    pass"
    )
    subprocess.run([sys.executable, "-c", program], env=env, timeout=120)
    assert server.attempts, "a Hub download without fedgen's switches reached no tripwire"


def test_simulated_dp_round_with_esm_lora_from_the_command_line(hf_bases, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable, "-m", "fedgen.cli", "simulate", "--model", str(hf_bases["esm"]), "--lora-rank", "4",
            "--sites", "2", "--rounds", "1", "--batch-size", "32", "--local-epochs", "0.25", "--out", str(out),
            "--json",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    model = summary["model"]
    assert model["architecture"] == "EsmForSequenceClassification" and model["finetune"] == "lora"
    assert model["base_digest"] == base_digest(read_checkpoint(hf_bases["esm"]))
    assert 0 < model["trainable_parameters"] < model["total_parameters"] / 10
    (only,) = summary["rounds"]
    assert set(only["epsilon"]) == {"site-0", "site-1"} and all(0 < e <= 8.0 + 1e-9 for e in only["epsilon"].values())
    # Checkpoints hold exactly the tensors that travel: adapters and head, never the base.
    checkpoints = sorted(out.glob("checkpoints/round-*.safetensors"))
    assert len(checkpoints) == 2
    travelling = _checkpoint_names(checkpoints[-1])
    assert all(".lora_" in n or ".modules_to_save." in n for n in travelling)
    assert sum(1 for n in travelling if ".lora_A." in n) == sum(1 for n in travelling if ".lora_B." in n) > 0
    # The lineage tells an auditor which base every adapter belongs to.
    (started,) = [r for r in read_records(out / "lineage.jsonl") if r["type"] == "run_started"]
    pinned = started["body"]["model_config"]
    assert pinned["base_digest"] == model["base_digest"]
    assert pinned["architecture"] == model["architecture"]
    assert pinned["total_parameters"] == model["total_parameters"] and pinned["lora_rank"] == 4

    # The released model, reloaded with transformers alone, is the model the aggregator evaluated.
    for fmt in ("merged", "adapters"):
        export = subprocess.run(
            [
                sys.executable, "-m", "fedgen.cli", "model", "export", "--ledger", str(out / "lineage.jsonl"),
                "--cert", str(pki.layout(out / "pki").lineage_cert), "--checkpoints", str(out / "checkpoints"),
                "--round", "1", "--allow-unapproved", "--format", fmt, "--base", str(hf_bases["esm"]),
                "--out", str(tmp_path / fmt),
            ],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert export.returncode == 0, export.stderr[-3000:]
    card = (tmp_path / "merged" / "MODEL_CARD.md").read_text()
    assert model["base_digest"] in card and "exported as merged" in card
    assert "| site-0 |" in card and "| site-1 |" in card  # ε per site
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    config = HFModelConfig(**pinned)
    test = load_bundled("test")
    ids = sequence_encoder(config, "", LocalBase(hf_bases["esm"])).encode(test.sequences, max_length=config.max_len)
    with torch.no_grad():
        logits = merged(input_ids=ids, attention_mask=(ids != merged.config.pad_token_id).long()).logits
    accuracy = (logits.argmax(-1) == torch.tensor(test.labels)).float().mean().item()
    assert abs(accuracy - only["accuracy"]) <= 1 / len(test)


def test_simulated_dp_round_with_dnabert_ffa_lora_a_robust_strategy_and_an_adversary(hf_bases, tmp_path):
    result = simulate(
        sites=3,
        rounds=1,
        model=str(hf_bases["bert"]),
        finetune="ffa-lora",
        strategy="median",
        adversaries={"site-2": "sign-flip"},
        batch_size=32,
        local_epochs=0.25,
        out=tmp_path / "run",
    )
    assert result.model["architecture"] == "BertForSequenceClassification" and result.model["finetune"] == "ffa-lora"
    (only,) = result.rounds
    assert {s.site for s in only.sites if s.status == "trained"} == {"site-0", "site-1", "site-2"}
    names = _checkpoint_names(only.checkpoint)
    assert names == _travelling(hf_bases["bert"], "ffa-lora", 70)
    assert not any(".lora_A." in n for n in names)  # FFA-LoRA: A stays home, frozen


def test_deployment_fine_tunes_a_checkpoint_over_mtls_and_calls_no_hub(hf_bases, tmp_path, tripwire, process_tree):
    server, env = tripwire
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable, "-m", "fedgen.cli", "demo", "--sites", "2", "--rounds", "1",
            "--model", str(hf_bases["esm"]), "--out", str(out), "--json",
        ],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    assert summary["model"]["base_digest"] == base_digest(read_checkpoint(hf_bases["esm"]))
    assert set(summary["rounds"][0]["epsilon"]) == {"site-0", "site-1"}
    checkpoints = sorted(out.glob("aggregator/state/checkpoints/round-*.safetensors"))
    assert _checkpoint_names(checkpoints[-1]) == _travelling(hf_bases["esm"], "lora", 70)
    for site in ("site-0", "site-1"):  # each site ran the per-sample gradient check before DP training
        checks = json.loads((out / "sites" / site / "state" / "gradient-checks.json").read_text())["checks"]
        assert [entry["result"]["passed"] for entry in checks.values()] == [True]
    assert server.attempts == []  # no hub, no proxy, nothing outbound
    assert processes_mentioning(str(out)) == []
    assert process_tree.running() == {}
