"""A checkpoint's own tokenizer behind the interface fedgen's tokenizers share.

Two conventions exist for DNA: tokenizers that split raw sequence themselves (Nucleotide
Transformer's 6-mer EsmTokenizer) and word-piece vocabularies of k-mers that expect the
sequence already written as space-separated overlapping k-mers (DNABERT). Which one a
checkpoint follows is found by trying: a raw sequence that tokenizes to unknown tokens,
with a vocabulary of k-mers, means DNABERT-style input.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .checkpoint import CheckpointError

_PROBE = "ACGTTGCAACGGTACCATGC"
_KMER = re.compile(r"^[ACGT]+$")


class HFSequenceTokenizer:
    """Encode DNA strings with a checkpoint's tokenizer into ``[B, T]`` id tensors.

    Attributes
    ----------
    pad_id : int
        The id padded positions hold; the classifier masks them out of attention.
    kmer : int or None
        ``k`` when sequences are written as overlapping k-mers first (DNABERT), else None.
    """

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder}: no usable tokenizer files ({exc})") from None
        if self.tokenizer.pad_token_id is None:
            raise CheckpointError(f"{folder}: the tokenizer defines no padding token")
        self.pad_id: int = int(self.tokenizer.pad_token_id)
        self.kmer = self._detect_kmer(folder)

    def _detect_kmer(self, folder: str | Path) -> int | None:
        unk = self.tokenizer.unk_token_id
        if unk is None or unk not in self.tokenizer(_PROBE)["input_ids"]:
            return None
        lengths = {len(token) for token in self.tokenizer.get_vocab() if _KMER.match(token)}
        if len(lengths) != 1:
            raise CheckpointError(
                f"{folder}: the tokenizer maps raw DNA to unknown tokens and its vocabulary is not k-mers of one length"
            )
        return lengths.pop()

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _words(self, sequence: str) -> str:
        sequence = sequence.upper()
        if self.kmer is None:
            return sequence
        k = self.kmer
        return " ".join(sequence[i : i + k] for i in range(max(1, len(sequence) - k + 1)))

    def token_length(self, seq_len: int) -> int:
        """Tokens (specials included) that a sequence of ``seq_len`` bases becomes."""
        probe = "".join(itertools.islice(itertools.cycle(_PROBE), seq_len))
        return len(self.tokenizer(self._words(probe))["input_ids"])

    def encode(self, sequences: Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """``[len(sequences), T]`` ids, right-padded, truncated to ``max_length`` tokens."""
        encoded = self.tokenizer(
            [self._words(s) for s in sequences],
            padding="max_length" if max_length else "longest",
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        )
        return encoded["input_ids"].long()
