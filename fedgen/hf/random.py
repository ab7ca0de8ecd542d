"""Randomly initialised checkpoints of real genomic architectures, saved as a site would
hold them (``save_pretrained`` weights, config and tokenizer files).

They stand in for downloaded checkpoints where none can be fetched: tests, benchmarks
and trying fedgen out. `esm_checkpoint` has the shape of Nucleotide Transformer (ESM,
non-overlapping 6-mer vocabulary, rotary positions); `bert_checkpoint` that of DNABERT
(BERT over overlapping k-mers).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

# Nucleotide Transformer v2 50M's transformer shape (its gated feed-forward aside).
NT_50M_SHAPE = dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=16, intermediate_size=2048)
TINY_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _kmers(k: int) -> list[str]:
    return ["".join(p) for p in itertools.product("ACGT", repeat=k)]


def _write_vocab(folder: Path, tokens: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def esm_checkpoint(
    folder: str | Path, *, shape: dict[str, int] | None = None, max_positions: int = 1026, seed: int = 0
) -> Path:
    """A Nucleotide-Transformer-shaped ESM masked LM with its 6-mer EsmTokenizer."""
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    folder = Path(folder)
    specials = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"]
    tokenizer = EsmTokenizer(str(_write_vocab(folder, specials + _kmers(6) + list("ACGTN"))))
    config = EsmConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        mask_token_id=tokenizer.mask_token_id,
        max_position_embeddings=max_positions,
        position_embedding_type="rotary",
        token_dropout=False,
        emb_layer_norm_before=False,
        **(shape or TINY_SHAPE),
    )
    return _save(EsmForMaskedLM, config, tokenizer, folder, seed)


def bert_checkpoint(
    folder: str | Path, *, k: int = 6, shape: dict[str, int] | None = None, max_positions: int = 512, seed: int = 0
) -> Path:
    """A DNABERT-shaped BERT masked LM with a word-piece vocabulary of ``k``-mers."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    folder = Path(folder)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = BertTokenizer(str(_write_vocab(folder, specials + _kmers(k))), do_lower_case=False)
    config = BertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=max_positions,
        **(shape or TINY_SHAPE),
    )
    return _save(BertForMaskedLM, config, tokenizer, folder, seed)


def _save(model_class, config, tokenizer, folder: Path, seed: int) -> Path:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def any_architecture_checkpoint(folder: str | Path, model_type: str, *, seed: int = 0) -> Path:
    """A tiny random masked LM of any transformers architecture that takes BERT-like
    config keys (``roberta``, ``distilbert``, ...), with the 6-mer ESM tokenizer."""
    from transformers import AutoConfig, AutoModelForMaskedLM, EsmTokenizer

    folder = Path(folder)
    specials = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"]
    tokenizer = EsmTokenizer(str(_write_vocab(folder, specials + _kmers(6) + list("ACGTN"))))
    shape = dict(TINY_SHAPE)
    if model_type == "distilbert":  # its own names for the same shape
        shape = dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, max_position_embeddings=514, **shape
    )
    return _save(AutoModelForMaskedLM.from_config, config, tokenizer, folder, seed)
