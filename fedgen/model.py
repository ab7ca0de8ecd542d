"""The built-in DNA language model: a compact transformer encoder.

Read top to bottom: one attention block, the encoder, and the two heads (sequence
classification, masked language modelling); its shape and presets are in `model_config`. Every layer is one that
Opacus computes per-sample gradients for (Linear, Embedding, LayerNorm); attention uses
Linear projections and ``scaled_dot_product_attention`` rather than
``nn.MultiheadAttention``, which Opacus rejects.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .model_config import PRESETS, ModelConfig, preset_config  # noqa: F401  (re-exported)


class SelfAttention(nn.Module):
    """Multi-head self-attention from Linear projections and fused SDPA."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        # [B, T, C] -> [B, H, T, C/H]
        q, k, v = (t.view(batch, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=key_mask[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block: attention then feed-forward, each residual."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ff_in = nn.Linear(cfg.d_model, cfg.d_ff)
        self.ff_out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), key_mask))
        return x + self.drop(self.ff_out(F.gelu(self.ff_in(self.norm2(x)))))


class DNAEncoder(nn.Module):
    """Token and learned position embeddings followed by transformer blocks."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # No padding_idx: Opacus' embedding grad sampler ignores it; pads are masked instead.
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``ids`` [B, T]; return hidden states [B, T, C] and the key mask [B, T]."""
        batch, length = ids.shape
        if length > self.cfg.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds max_len {self.cfg.max_len}")
        key_mask = ids != self.cfg.pad_id
        # Per-sample grad samplers need a [B, T] contiguous index tensor, not a broadcast one.
        pos = torch.arange(length, device=ids.device).expand(batch, length).contiguous()
        x = self.tokens(ids) + self.positions(pos)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x), key_mask


class SequenceClassifier(nn.Module):
    """Encoder, masked mean pooling over real tokens, and a linear classifier."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = DNAEncoder(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.num_labels)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden, key_mask = self.encoder(ids)
        weights = key_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)


class MaskedLanguageModel(nn.Module):
    """Encoder with a per-token vocabulary head for masked-LM pretraining."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = DNAEncoder(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.encoder(ids)
        return self.head(hidden)


def mask_tokens(
    ids: torch.Tensor,
    *,
    mask_id: int,
    pad_id: int,
    cls_id: int,
    vocab_size: int,
    num_special: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking: return (inputs, labels) with labels -100 where not predicted.

    Of the chosen positions 80% become the mask token, 10% a random token, 10% stay.
    """
    maskable = (ids != pad_id) & (ids != cls_id)
    draw = torch.rand(ids.shape, generator=generator, device=ids.device)
    chosen = maskable & (draw < probability)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator, device=ids.device)
    random_ids = torch.randint(num_special, vocab_size, ids.shape, generator=generator, device=ids.device)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, labels


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def build_model(cfg: ModelConfig, *, task: str = "classification", seed: int = 0) -> nn.Module:
    """Build a model whose initial weights depend only on ``cfg``, ``task`` and ``seed``."""
    models = {"classification": SequenceClassifier, "mlm": MaskedLanguageModel}
    if task not in models:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(models)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = models[task](cfg)
        model.apply(_init_weights)
    # Residual projections scaled down with depth keep early training stable.
    for name, param in model.named_parameters():
        if name.endswith(("attn.out.weight", "ff_out.weight")):
            with torch.no_grad():
                param.mul_(1.0 / math.sqrt(2 * cfg.n_layers))
    return model


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those that require gradients)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this site")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
    return device


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on a labelled set."""
    model.to(device).eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(ids), batch_size):
        x = ids[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        logits = model(x)
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    return total_loss / len(ids), correct / len(ids)
