"""Tests for fedgen.tokenizers."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

from fedgen.tokenizers import (
    CLS_ID,
    MASK_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    KmerTokenizer,
    NucleotideTokenizer,
    make_tokenizer,
    tokenizer_from_config,
)

ALL_NAMES = ["nucleotide", "kmer1", "kmer3", "kmer4", "kmer5", "kmer6", "kmer6s1", "kmer4s2"]


def random_sequences(count: int, min_length: int, max_length: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_length, max_length + 1, size=count)
    bases = "".join(np.array(list("ACGT"))[rng.integers(0, 4, size=int(lengths.sum()))])
    ends = np.cumsum(lengths)
    return [bases[end - length : end] for end, length in zip(ends, lengths)]


def tokens_of_row(tokenizer, row: torch.Tensor) -> list[str]:
    """Token strings of one encoded row, [CLS] and padding removed."""
    assert row[0].item() == CLS_ID
    return [tokenizer.vocab[i] for i in row[1:].tolist() if i != PAD_ID]


def test_special_token_ids():
    assert SPECIAL_TOKENS == ("[PAD]", "[CLS]", "[MASK]", "[UNK]")
    for name in ALL_NAMES:
        tokenizer = make_tokenizer(name)
        assert (
            (tokenizer.pad_id, tokenizer.cls_id, tokenizer.mask_id, tokenizer.unk_id)
            == (PAD_ID, CLS_ID, MASK_ID, UNK_ID)
            == (0, 1, 2, 3)
        )
        assert tokenizer.vocab[:4] == SPECIAL_TOKENS
        assert tokenizer.name == name


def test_vocab_sizes():
    assert NucleotideTokenizer().vocab_size == 4 + 5
    assert NucleotideTokenizer().vocab[4:] == ("A", "C", "G", "T", "N")
    for k in range(1, 7):
        tokenizer = KmerTokenizer(k)
        assert tokenizer.vocab_size == 4 + 4**k
        expected = tuple("".join(p) for p in itertools.product("ACGT", repeat=k))
        assert tokenizer.vocab[4:] == expected
    assert KmerTokenizer(6, stride=1).vocab_size == 4 + 4**6


@pytest.mark.parametrize("name", ALL_NAMES)
def test_encode_shape_cls_padding_and_range(name):
    tokenizer = make_tokenizer(name)
    sequences = random_sequences(50, 0, 40)
    ids = tokenizer.encode(sequences)
    assert ids.dtype == torch.int64
    lengths = [tokenizer.token_length(len(s)) for s in sequences]
    assert ids.shape == (50, max(lengths))
    assert torch.all(ids[:, 0] == CLS_ID)
    assert int(ids.min()) >= 0 and int(ids.max()) < tokenizer.vocab_size
    for row, length in zip(ids, lengths):
        assert torch.all(row[1:length] >= len(SPECIAL_TOKENS))  # pure ACGT: no special tokens
        assert torch.all(row[length:] == PAD_ID)


def test_nucleotide_round_trip_and_case():
    tokenizer = NucleotideTokenizer()
    ids = tokenizer.encode(["acgtn", "GG"])
    assert ids.tolist() == [[1, 4, 5, 6, 7, 8], [1, 6, 6, 0, 0, 0]]
    sequences = random_sequences(20, 1, 30, seed=1)
    for sequence, row in zip(sequences, tokenizer.encode(sequences)):
        assert "".join(tokens_of_row(tokenizer, row)) == sequence


def test_nucleotide_unknown_characters():
    ids = NucleotideTokenizer().encode(["AXé-C"])
    assert ids.tolist() == [[CLS_ID, 4, UNK_ID, UNK_ID, UNK_ID, 5]]


def test_kmer_non_overlapping_drops_remainder():
    tokenizer = KmerTokenizer(3)
    ids = tokenizer.encode(["AAACCCGGGTT"])  # 11 bases: 3 full 3-mers, "TT" dropped
    assert tokens_of_row(tokenizer, ids[0]) == ["AAA", "CCC", "GGG"]
    assert ids.shape == (1, 4)
    assert tokenizer.token_length(11) == 4
    assert tokenizer.token_length(2) == 1
    assert tokenizer.encode(["AC"]).tolist() == [[CLS_ID]]


def test_kmer_ids_are_lexicographic_rank():
    tokenizer = KmerTokenizer(2)
    ids = tokenizer.encode(["AAACAGATTT"])[0, 1:].tolist()
    assert ids == [4 + 0, 4 + 1, 4 + 2, 4 + 3, 4 + 15]


def test_kmer_overlapping_round_trip():
    tokenizer = KmerTokenizer(6, stride=1)
    sequences = random_sequences(30, 6, 50, seed=2)
    for sequence, row in zip(sequences, tokenizer.encode(sequences)):
        tokens = tokens_of_row(tokenizer, row)
        assert len(tokens) == len(sequence) - 5
        assert tokens == [sequence[i : i + 6] for i in range(len(sequence) - 5)]


def test_kmer_stride_between_one_and_k():
    tokenizer = KmerTokenizer(4, stride=2)
    sequence = "ACGTACGTAC"  # starts 0, 2, 4, 6
    assert tokens_of_row(tokenizer, tokenizer.encode([sequence])[0]) == ["ACGT", "GTAC", "ACGT", "GTAC"]
    assert tokenizer.token_length(len(sequence)) == 5


@pytest.mark.parametrize("k", [3, 4, 6])
def test_kmer_non_overlapping_round_trip(k):
    tokenizer = KmerTokenizer(k)
    sequences = random_sequences(30, 0, 60, seed=k)
    for sequence, row in zip(sequences, tokenizer.encode(sequences)):
        kept = len(sequence) // k * k
        assert "".join(tokens_of_row(tokenizer, row)) == sequence[:kept]


def test_kmer_with_n_or_other_maps_to_unk():
    tokenizer = KmerTokenizer(3)
    row = tokenizer.encode(["ACGNACGTTxCC"])[0].tolist()
    acg, gtt = tokenizer.vocab.index("ACG"), tokenizer.vocab.index("GTT")
    assert row == [CLS_ID, acg, UNK_ID, gtt, UNK_ID]
    overlapping = KmerTokenizer(3, stride=1).encode(["AANAAA"])[0].tolist()
    assert overlapping[1:] == [UNK_ID, UNK_ID, UNK_ID, 4]


def test_kmer_lowercase_matches_uppercase():
    tokenizer = KmerTokenizer(4)
    assert torch.equal(tokenizer.encode(["acgtggcc"]), tokenizer.encode(["ACGTGGCC"]))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_max_length_truncates_and_pads(name):
    tokenizer = make_tokenizer(name)
    sequences = random_sequences(10, 20, 40, seed=3)
    full = tokenizer.encode(sequences)
    short = tokenizer.encode(sequences, max_length=5)
    assert short.shape == (10, 5)
    assert torch.equal(short, full[:, :5])
    long = tokenizer.encode(sequences, max_length=full.shape[1] + 7)
    assert torch.equal(long[:, : full.shape[1]], full)
    assert torch.all(long[:, full.shape[1] :] == PAD_ID)
    assert tokenizer.encode(sequences, max_length=1).tolist() == [[CLS_ID]] * 10


def test_token_length_formulas():
    nucleotide = NucleotideTokenizer()
    assert [nucleotide.token_length(n) for n in (0, 1, 70)] == [1, 2, 71]
    kmer6 = KmerTokenizer(6)
    assert [kmer6.token_length(n) for n in (0, 5, 6, 11, 12, 70)] == [1, 1, 2, 2, 3, 12]
    overlapping = KmerTokenizer(6, stride=1)
    assert [overlapping.token_length(n) for n in (5, 6, 70)] == [1, 2, 66]
    with pytest.raises(ValueError):
        kmer6.token_length(-1)


def test_encode_rejects_bad_input():
    tokenizer = NucleotideTokenizer()
    with pytest.raises(TypeError, match="list"):
        tokenizer.encode("ACGT")
    with pytest.raises(ValueError, match="max_length"):
        tokenizer.encode(["ACGT"], max_length=0)


def test_encode_empty_batch():
    assert KmerTokenizer(3).encode([]).shape == (0, 1)
    assert NucleotideTokenizer().encode([], max_length=8).shape == (0, 8)


def test_kmer_rejects_bad_parameters():
    for k, stride in [(0, None), (9, None), (4, 0), (4, 5)]:
        with pytest.raises(ValueError):
            KmerTokenizer(k, stride)


def test_make_tokenizer_names():
    assert isinstance(make_tokenizer("nucleotide"), NucleotideTokenizer)
    for k in range(3, 7):
        tokenizer = make_tokenizer(f"kmer{k}")
        assert (tokenizer.k, tokenizer.stride) == (k, k)
    overlapping = make_tokenizer("kmer6s1")
    assert (overlapping.k, overlapping.stride) == (6, 1)
    for bad in ["bpe", "kmer", "KMER6", "kmer6s", "kmer0"]:
        with pytest.raises(ValueError):
            make_tokenizer(bad)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_config_round_trip(name):
    tokenizer = make_tokenizer(name)
    config = tokenizer.to_config()
    rebuilt = tokenizer_from_config(config)
    assert rebuilt.name == name
    assert rebuilt.vocab == tokenizer.vocab
    sequences = random_sequences(5, 10, 20)
    assert torch.equal(rebuilt.encode(sequences), tokenizer.encode(sequences))


def test_config_errors():
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        tokenizer_from_config({"type": "bpe"})
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizer_from_config({"type": "kmer", "k": 4, "stride": 4, "vocab_size": 100})


def test_encode_is_fast_enough():
    sequences = random_sequences(6000, 70, 70, seed=5)
    for name in ("nucleotide", "kmer6", "kmer6s1"):
        tokenizer = make_tokenizer(name)
        start = time.perf_counter()
        ids = tokenizer.encode(sequences)
        elapsed = time.perf_counter() - start
        assert ids.shape == (6000, tokenizer.token_length(70))
        assert elapsed < 1.0, f"{name}: {elapsed:.2f}s"
