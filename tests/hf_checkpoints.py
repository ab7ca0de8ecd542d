"""Checkpoint folders for tests: tiny random ESM and BERT (fedgen.hf.random), and one whose
shipped modeling code mixes the samples of a batch (BatchNorm-style statistics), which
only a site that opts into ``trust_remote_code`` runs and fedgen's DP check must refuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

_CONFIGURATION = """
from transformers import PretrainedConfig


class MixingConfig(PretrainedConfig):
    model_type = "mixing-dna"

    def __init__(self, vocab_size=4107, hidden_size=16, pad_token_id=1, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        super().__init__(pad_token_id=pad_token_id, **kwargs)
"""

_MODELING = """
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .configuration_mixing import MixingConfig


class MixingForSequenceClassification(PreTrainedModel):
    config_class = MixingConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.query(self.embed(input_ids)) + self.value(self.embed(input_ids))
        hidden = hidden - hidden.mean(dim=0, keepdim=True)  # batch statistics: samples mix
        return SequenceClassifierOutput(logits=self.classifier(hidden.mean(dim=1)))
"""


def mixing_checkpoint(folder: Path, tokenizer_from: Path) -> Path:
    """A remote-code checkpoint whose forward pass mixes a batch's samples."""
    folder.mkdir(parents=True)
    (folder / "configuration_mixing.py").write_text(_CONFIGURATION)
    (folder / "modeling_mixing.py").write_text(_MODELING)
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    config = {
        "model_type": "mixing-dna",
        "architectures": ["MixingForSequenceClassification"],
        "auto_map": {
            "AutoConfig": "configuration_mixing.MixingConfig",
            "AutoModelForSequenceClassification": "modeling_mixing.MixingForSequenceClassification",
        },
        "vocab_size": 4107,
        "hidden_size": 16,
        "pad_token_id": 1,
    }
    (folder / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    weights = {
        "embed.weight": torch.randn(4107, 16, generator=generator),
        "query.weight": torch.randn(16, 16, generator=generator),
        "query.bias": torch.zeros(16),
        "value.weight": torch.randn(16, 16, generator=generator),
        "value.bias": torch.zeros(16),
    }
    from safetensors.torch import save_file

    save_file(weights, str(folder / "model.safetensors"))
    return folder
