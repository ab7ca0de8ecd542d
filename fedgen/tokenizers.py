"""Tokenizers turning DNA strings into id tensors for the models.

Every tokenizer shares four special tokens, ``[PAD]`` = 0, ``[CLS]`` = 1,
``[MASK]`` = 2 and ``[UNK]`` = 3, followed by its own vocabulary. An encoded
sequence is ``[CLS]`` followed by its tokens, right-padded with ``[PAD]``.

Names understood by :func:`make_tokenizer`:

* ``"nucleotide"``: one token per base, vocabulary ``A, C, G, T, N``.
* ``"kmer<k>"`` (e.g. ``"kmer6"``): non-overlapping k-mers, 1 <= k <= 8.
* ``"kmer<k>s<stride>"`` (e.g. ``"kmer6s1"``): k-mers starting every
  ``stride`` bases; stride 1 gives the overlapping k-mers of DNABERT.

Encoding works on whole batches with numpy lookup tables, so tokenizing
thousands of short sequences takes milliseconds.
"""

from __future__ import annotations

import itertools
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

PAD_TOKEN, CLS_TOKEN, MASK_TOKEN, UNK_TOKEN = "[PAD]", "[CLS]", "[MASK]", "[UNK]"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, MASK_TOKEN, UNK_TOKEN)
PAD_ID, CLS_ID, MASK_ID, UNK_ID = 0, 1, 2, 3
MAX_K = 8  # 4**8 = 65,536 k-mers; larger vocabularies make embedding tables unwieldy

_BASES = "ACGT"
_NOT_A_BASE = len(_BASES)  # code for N and any other character in k-mer lookups
_KMER_NAME = re.compile(r"kmer(\d+)(?:s(\d+))?")


def _byte_lookup(values: dict[str, int], default: int) -> np.ndarray:
    """256-entry table mapping a byte to ``values`` of its character, either case."""
    table = np.full(256, default, dtype=np.int64)
    for char, value in values.items():
        table[ord(char.upper())] = value
        table[ord(char.lower())] = value
    return table


def _byte_matrix(sequences: Sequence[str], lengths: np.ndarray) -> np.ndarray:
    """Stack strings into a zero-padded ``[B, max length]`` uint8 matrix of their bytes."""
    # Non-ASCII characters become a single '?' each, keeping positions aligned.
    flat = np.frombuffer("".join(sequences).encode("ascii", "replace"), dtype=np.uint8)
    width = int(lengths.max()) if len(lengths) else 0
    matrix = np.zeros((len(sequences), width), dtype=np.uint8)
    matrix[np.arange(width) < lengths[:, None]] = flat
    return matrix


class Tokenizer(ABC):
    """Interface shared by all tokenizers.

    Attributes
    ----------
    vocab : tuple of str
        Token strings indexed by id: the special tokens, then the tokenizer's own.
    pad_id, cls_id, mask_id, unk_id : int
        Ids of the special tokens.
    """

    pad_id = PAD_ID
    cls_id = CLS_ID
    mask_id = MASK_ID
    unk_id = UNK_ID

    def __init__(self, tokens: Sequence[str]) -> None:
        self.vocab: tuple[str, ...] = SPECIAL_TOKENS + tuple(tokens)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.vocab)

    @property
    @abstractmethod
    def name(self) -> str:
        """Short name accepted by :func:`make_tokenizer`."""

    @abstractmethod
    def _token_counts(self, seq_lengths: np.ndarray) -> np.ndarray:
        """Number of tokens (without ``[CLS]``) for sequences of these lengths."""

    @abstractmethod
    def _bases_for_tokens(self, n_tokens: int) -> int:
        """Shortest prefix length that yields ``n_tokens`` tokens."""

    @abstractmethod
    def _token_ids(self, bases: np.ndarray, seq_lengths: np.ndarray) -> np.ndarray:
        """Ids for a ``[B, L]`` byte matrix, ``[B, max tokens]``, ``[PAD]`` past each row's end."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable description, inverse of :func:`tokenizer_from_config`."""

    def token_length(self, seq_len: int) -> int:
        """Number of ids, ``[CLS]`` included, for a sequence of ``seq_len`` bases."""
        if seq_len < 0:
            raise ValueError(f"seq_len must be non-negative, got {seq_len}")
        return 1 + int(self._token_counts(np.array([seq_len]))[0])

    def encode(self, sequences: Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Encode a batch of sequences.

        Parameters
        ----------
        sequences
            DNA strings, any case. Characters other than ``ACGT`` (and ``N`` for
            the nucleotide tokenizer) become ``[UNK]``.
        max_length
            If given, every row is cut or ``[PAD]``-padded to exactly this many
            ids (``[CLS]`` included). Otherwise rows are padded to the longest.

        Returns
        -------
        torch.Tensor
            int64 tensor of shape ``[len(sequences), T]``; column 0 is ``[CLS]``.
        """
        if isinstance(sequences, str):
            raise TypeError("encode expects a sequence of strings; wrap a single string in a list")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for [CLS]), got {max_length}")
        if max_length is not None:
            # Bases past what max_length can hold would be tokenized only to be cut off.
            cap = self._bases_for_tokens(max_length - 1)
            sequences = [sequence[:cap] for sequence in sequences]
        seq_lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
        body = self._token_ids(_byte_matrix(sequences, seq_lengths), seq_lengths)

        width = max_length if max_length is not None else 1 + body.shape[1]
        ids = np.full((len(sequences), width), PAD_ID, dtype=np.int64)
        ids[:, 0] = CLS_ID
        kept = min(width - 1, body.shape[1])
        ids[:, 1 : 1 + kept] = body[:, :kept]
        import torch  # here: the coordinator sizes a model from a tokenizer without torch

        return torch.from_numpy(ids)


class NucleotideTokenizer(Tokenizer):
    """One token per base: ``A, C, G, T, N`` (ids 4-8); other characters map to ``[UNK]``."""

    def __init__(self) -> None:
        super().__init__(tuple("ACGTN"))
        self._id_of_byte = _byte_lookup(
            {base: len(SPECIAL_TOKENS) + i for i, base in enumerate("ACGTN")}, default=UNK_ID
        )

    @property
    def name(self) -> str:
        return "nucleotide"

    def __repr__(self) -> str:
        return "NucleotideTokenizer()"

    def _token_counts(self, seq_lengths: np.ndarray) -> np.ndarray:
        return seq_lengths

    def _bases_for_tokens(self, n_tokens: int) -> int:
        return n_tokens

    def _token_ids(self, bases: np.ndarray, seq_lengths: np.ndarray) -> np.ndarray:
        ids = self._id_of_byte[bases]
        ids[np.arange(bases.shape[1]) >= seq_lengths[:, None]] = PAD_ID
        return ids

    def to_config(self) -> dict[str, Any]:
        return {"type": "nucleotide", "vocab_size": self.vocab_size}


class KmerTokenizer(Tokenizer):
    """k-mer tokens starting every ``stride`` bases.

    The vocabulary is all ``4**k`` k-mers over ``ACGT`` in lexicographic order
    (ids from 4). A k-mer containing ``N`` or any other character maps to
    ``[UNK]``. Bases after the last complete k-mer (fewer than ``k`` remaining,
    or not reached by the stride) are dropped, so a sequence of length ``L``
    gives ``(L - k) // stride + 1`` tokens, or none when ``L < k``.

    Parameters
    ----------
    k
        k-mer length, 1 to 8.
    stride
        Distance between k-mer starts, 1 to ``k``; defaults to ``k``
        (non-overlapping). ``stride=1`` gives overlapping k-mers as in DNABERT.
    """

    def __init__(self, k: int, stride: int | None = None) -> None:
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
        stride = k if stride is None else stride
        if not 1 <= stride <= k:
            raise ValueError(f"stride must be between 1 and k={k}, got {stride}")
        super().__init__(tuple("".join(kmer) for kmer in itertools.product(_BASES, repeat=k)))
        self.k = k
        self.stride = stride
        self._code_of_byte = _byte_lookup({base: i for i, base in enumerate(_BASES)}, default=_NOT_A_BASE)
        # Base-4 place values so that a k-mer's index is its lexicographic rank.
        self._place_values = len(_BASES) ** np.arange(k - 1, -1, -1, dtype=np.int64)

    @property
    def name(self) -> str:
        return f"kmer{self.k}" if self.stride == self.k else f"kmer{self.k}s{self.stride}"

    def __repr__(self) -> str:
        return f"KmerTokenizer(k={self.k}, stride={self.stride})"

    def _token_counts(self, seq_lengths: np.ndarray) -> np.ndarray:
        return np.where(seq_lengths >= self.k, (seq_lengths - self.k) // self.stride + 1, 0)

    def _bases_for_tokens(self, n_tokens: int) -> int:
        return 0 if n_tokens == 0 else (n_tokens - 1) * self.stride + self.k

    def _token_ids(self, bases: np.ndarray, seq_lengths: np.ndarray) -> np.ndarray:
        if bases.shape[1] < self.k:
            return np.zeros((bases.shape[0], 0), dtype=np.int64)
        codes = self._code_of_byte[bases]
        all_windows = np.lib.stride_tricks.sliding_window_view(codes, self.k, axis=1)
        windows = all_windows[:, :: self.stride]
        ids = len(SPECIAL_TOKENS) + windows @ self._place_values
        ids[(windows == _NOT_A_BASE).any(axis=2)] = UNK_ID
        ids[np.arange(ids.shape[1]) >= self._token_counts(seq_lengths)[:, None]] = PAD_ID
        return ids

    def to_config(self) -> dict[str, Any]:
        return {"type": "kmer", "k": self.k, "stride": self.stride, "vocab_size": self.vocab_size}


def make_tokenizer(name: str) -> Tokenizer:
    """Build a tokenizer by name: ``"nucleotide"``, ``"kmer<k>"`` or ``"kmer<k>s<stride>"``."""
    if name == "nucleotide":
        return NucleotideTokenizer()
    match = _KMER_NAME.fullmatch(name)
    if match is None:
        raise ValueError(
            f"unknown tokenizer {name!r}; expected 'nucleotide', 'kmer<k>' (e.g. 'kmer6') "
            f"or 'kmer<k>s<stride>' (e.g. 'kmer6s1' for overlapping 6-mers)"
        )
    k = int(match.group(1))
    try:
        return KmerTokenizer(k, int(match.group(2)) if match.group(2) else None)
    except ValueError as exc:
        raise ValueError(f"tokenizer {name!r}: {exc}") from None


def tokenizer_from_config(config: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.to_config` output.

    Raises ``ValueError`` for an unknown type or when a stored ``vocab_size``
    does not match the rebuilt tokenizer (e.g. a checkpoint from another version).
    """
    kind = config.get("type")
    if kind == "nucleotide":
        tokenizer: Tokenizer = NucleotideTokenizer()
    elif kind == "kmer":
        tokenizer = KmerTokenizer(int(config["k"]), int(config.get("stride", config["k"])))
    else:
        raise ValueError(f"unknown tokenizer type {kind!r} in config; expected 'nucleotide' or 'kmer'")
    stored_size = config.get("vocab_size")
    if stored_size is not None and stored_size != tokenizer.vocab_size:
        raise ValueError(
            f"tokenizer config says vocab_size={stored_size} but {tokenizer.name} has {tokenizer.vocab_size}"
        )
    return tokenizer
