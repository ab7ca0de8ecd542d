"""Tests for fedgen.data: readers, validation messages, splitting and bundled data."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fedgen.data import (
    BUNDLED_DATA,
    DataError,
    SequenceDataset,
    bundled_data_dir,
    load_bundled,
    load_dataset,
    read_csv,
    read_fasta,
    read_genomic_benchmarks,
    train_test_split,
)

# The original file sits in ../shared beside the checkout (as in CI).
PROMOTER_SOURCE = Path(__file__).resolve().parents[3] / "shared" / "data" / "promoter_core_70bp" / "promoters.csv"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as stream:
            stream.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def check_error(error: DataError, path: Path, line: int | None, *fragments: str) -> None:
    """Assert that ``error`` is located at ``path``/``line`` and its message has ``fragments``."""
    message = str(error)
    assert error.path == str(path)
    assert error.line == line
    assert message.startswith(str(path) if line is None else f"{path}, line {line}: ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --------------------------------------------------------------------------- SequenceDataset


def make_dataset(labels: list[int], names=("neg", "pos")) -> SequenceDataset:
    sequences = tuple("ACGT"[i % 4] * (i + 1) for i in range(len(labels)))
    return SequenceDataset(sequences, np.array(labels), names, "memory")


def test_dataset_subset_and_counts():
    dataset = make_dataset([0, 1, 1, 0, 1])
    assert len(dataset) == 5
    assert dataset.class_counts() == {"neg": 2, "pos": 3}
    part = dataset.subset([4, 0])
    assert part.sequences == (dataset.sequences[4], dataset.sequences[0])
    assert part.labels.tolist() == [1, 0]
    assert part.label_names == ("neg", "pos")
    mask_part = dataset.subset(np.array([True, False, False, False, True]))
    assert mask_part.labels.tolist() == [0, 1]
    assert dataset.subset([]).class_counts() == {"neg": 0, "pos": 0}


def test_dataset_labels_are_frozen_copies():
    labels = np.array([0, 1])
    dataset = SequenceDataset(("A", "C"), labels, ("a", "b"), "memory")
    labels[0] = 1
    assert dataset.labels.tolist() == [0, 1]
    assert dataset.labels.dtype == np.int64
    with pytest.raises(ValueError):
        dataset.labels[0] = 1


def test_dataset_rejects_inconsistent_labels():
    with pytest.raises(ValueError, match="one entry per sequence"):
        SequenceDataset(("A", "C"), np.array([0]), ("a",), "memory")
    with pytest.raises(ValueError, match="index label_names"):
        SequenceDataset(("A",), np.array([2]), ("a", "b"), "memory")


# --------------------------------------------------------------------------- read_csv


def test_read_csv_basic(tmp_path):
    path = write(tmp_path / "x.csv", "id,sequence,label\n1,acgtn,1\n2,GGCC,0\n\n3,TTAA,1\n")
    dataset = read_csv(path)
    assert dataset.sequences == ("ACGTN", "GGCC", "TTAA")
    assert dataset.label_names == ("0", "1")
    assert dataset.labels.tolist() == [1, 0, 1]
    assert dataset.source == str(path)


def test_read_csv_skips_byte_order_mark(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfsequence,label\nACGT,1\n")
    assert read_csv(path).sequences == ("ACGT",)


def test_read_csv_integer_labels_sorted_numerically(tmp_path):
    path = write(tmp_path / "x.csv", "sequence,label\nA,10\nC,2\nG,02\n")
    dataset = read_csv(path)
    assert dataset.label_names == ("2", "10")
    assert dataset.labels.tolist() == [1, 0, 0]


def test_read_csv_string_labels_sorted(tmp_path):
    path = write(tmp_path / "x.csv", "sequence,label\nA,promoter\nC,enhancer\nG,promoter\n")
    dataset = read_csv(path)
    assert dataset.label_names == ("enhancer", "promoter")
    assert dataset.labels.tolist() == [1, 0, 1]


def test_read_csv_given_label_names_set_order(tmp_path):
    path = write(tmp_path / "x.csv", "sequence,label\nA,0\nC,1\n")
    dataset = read_csv(path, label_names=("1", "0"))
    assert dataset.labels.tolist() == [1, 0]


def test_read_csv_custom_columns(tmp_path):
    path = write(tmp_path / "x.csv", "dna,class\nACG,x\n")
    dataset = read_csv(path, sequence_column="dna", label_column="class")
    assert dataset.sequences == ("ACG",)


def test_read_tsv_and_gzip(tmp_path):
    tsv = write(tmp_path / "x.tsv", "sequence\tlabel\nACGT\t1\nCCCC\t0\n")
    assert read_csv(tsv).sequences == ("ACGT", "CCCC")
    csv_gz = write(tmp_path / "x.csv.gz", "sequence,label\nACGT,1\nCCCC,0\n")
    assert read_csv(csv_gz).labels.tolist() == [1, 0]
    tsv_gz = write(tmp_path / "x.tsv.gz", "sequence\tlabel\nACGT\t1\n")
    assert read_csv(tsv_gz).sequences == ("ACGT",)


def test_read_csv_missing_file(tmp_path):
    path = tmp_path / "absent.csv"
    with pytest.raises(DataError) as info:
        read_csv(path)
    check_error(info.value, path, None, "not found")


def test_read_csv_empty_file(tmp_path):
    path = write(tmp_path / "x.csv", "")
    with pytest.raises(DataError) as info:
        read_csv(path)
    check_error(info.value, path, None, "empty")


def test_read_csv_header_only(tmp_path):
    path = write(tmp_path / "x.csv", "sequence,label\n")
    with pytest.raises(DataError) as info:
        read_csv(path)
    check_error(info.value, path, None, "no data rows")


def test_read_csv_missing_column_lists_columns_found(tmp_path):
    path = write(tmp_path / "x.csv", "seq,label\nACGT,1\n")
    with pytest.raises(DataError) as info:
        read_csv(path)
    check_error(info.value, path, 1, "'sequence'", "columns found: 'seq', 'label'")
    with pytest.raises(DataError) as info:
        read_csv(path, sequence_column="seq", label_column="target")
    check_error(info.value, path, 1, "'target'")


def test_read_csv_empty_sequence(tmp_path):
    path = write(tmp_path / "x.csv", "sequence,label\nACGT,1\n,0\n")
    with pytest.raises(DataError) as info:
        read_csv(path)
    check_error(info.value, path, 3, "empty sequence")


def test_read_csv_bad_character(tmp_path):
    path = write(tmp_path / "data.csv", "sequence,label\nACGT,1\nACGTZ,0\n")
    with pytest.raises(DataError) as info:
        read_csv(path)
    check_error(info.value, path, 3, "character 'Z' at position 5 is not one of A, C, G, T, N")


def test_read_csv_bad_character_line_counts_blank_lines(tmp_path):
    path = write(tmp_path / "data.csv", "sequence,label\n\nAC-T,1\n")
    with pytest.raises(DataError) as info:
        read_csv(path)
    check_error(info.value, path, 3, "'-' at position 3")


def test_read_csv_bad_character_in_gzip_file(tmp_path):
    path = write(tmp_path / "data.csv.gz", "sequence,label\nACGT,1\nAXGT,0\n")
    with pytest.raises(DataError) as info:
        read_csv(path)
    check_error(info.value, path, 3, "'X' at position 2")


def test_read_csv_missing_label(tmp_path):
    path = write(tmp_path / "x.csv", "sequence,label\nACGT,1\nACGT,\nAC,0\n")
    with pytest.raises(DataError) as info:
        read_csv(path)
    check_error(info.value, path, 3, "missing label")
    short_row = write(tmp_path / "y.csv", "sequence,label\nACGT\n")
    with pytest.raises(DataError) as info:
        read_csv(short_row)
    check_error(info.value, short_row, 2, "missing label")


def test_read_csv_unknown_label(tmp_path):
    path = write(tmp_path / "x.csv", "sequence,label\nACGT,1\nACGT,0\nACGT,2\n")
    with pytest.raises(DataError) as info:
        read_csv(path, label_names=("0", "1"))
    check_error(info.value, path, 4, "'2'", "0, 1")


def test_read_csv_not_gzip(tmp_path):
    path = write(tmp_path / "fake.csv.gz", "placeholder")
    path.write_text("sequence,label\nACGT,1\n")
    with pytest.raises(DataError) as info:
        read_csv(path)
    check_error(info.value, path, None, "gzip")


# --------------------------------------------------------------------------- read_fasta


def test_read_fasta_labels_from_file_multiline(tmp_path):
    promoter = write(tmp_path / "promoter.fa", ">a\nACGT\nacg\n\n>b\nTTTT\n")
    background = write(tmp_path / "background.fasta.gz", ">c\nGGGG\nCC\n")
    dataset = read_fasta([promoter, background])
    assert dataset.label_names == ("background", "promoter")
    assert dataset.sequences == ("ACGTACG", "TTTT", "GGGGCC")
    assert dataset.labels.tolist() == [1, 1, 0]


def test_read_fasta_single_path_is_one_class(tmp_path):
    path = write(tmp_path / "enhancers.fna", ">a\nAC\n>b\nGT\n")
    dataset = read_fasta(path)
    assert dataset.label_names == ("enhancers",)
    assert dataset.labels.tolist() == [0, 0]


def test_read_fasta_labels_from_header(tmp_path):
    path = write(
        tmp_path / "mixed.fa",
        ">seq1 label=promoter source=x\nACGT\n>chr1:1-4|strand+|background\nAAAA\n>seq3|label=promoter|other\nCC\nGG\n",
    )
    dataset = read_fasta(path, labels_from="header")
    assert dataset.label_names == ("background", "promoter")
    assert dataset.labels.tolist() == [1, 0, 1]
    assert dataset.sequences[2] == "CCGG"


def test_read_fasta_header_integer_labels(tmp_path):
    path = write(tmp_path / "x.fa", ">a|1\nAC\n>b|0\nGT\n")
    dataset = read_fasta(path, labels_from="header")
    assert dataset.label_names == ("0", "1")
    assert dataset.labels.tolist() == [1, 0]


def test_read_fasta_no_label_in_header(tmp_path):
    path = write(tmp_path / "x.fa", ">a|1\nAC\n>plain header\nGT\n")
    with pytest.raises(DataError) as info:
        read_fasta(path, labels_from="header")
    check_error(info.value, path, 3, "no label in header '>plain header'")


def test_read_fasta_unknown_header_label(tmp_path):
    path = write(tmp_path / "x.fa", ">a|1\nAC\n>b|7\nGT\n")
    with pytest.raises(DataError) as info:
        read_fasta(path, labels_from="header", label_names=("0", "1"))
    check_error(info.value, path, 3, "'7'")


def test_read_fasta_sequence_before_header(tmp_path):
    path = write(tmp_path / "x.fa", "\nACGT\n>a\nAC\n")
    with pytest.raises(DataError) as info:
        read_fasta(path)
    check_error(info.value, path, 2, "before any '>' header")


def test_read_fasta_header_without_sequence(tmp_path):
    path = write(tmp_path / "x.fa", ">a\nAC\n>empty\n>c\nGT\n")
    with pytest.raises(DataError) as info:
        read_fasta(path)
    check_error(info.value, path, 3, "'>empty' has no sequence")
    at_end = write(tmp_path / "y.fa", ">a\nAC\n>last\n\n")
    with pytest.raises(DataError) as info:
        read_fasta(at_end)
    check_error(info.value, at_end, 3, "'>last' has no sequence")


def test_read_fasta_bad_character(tmp_path):
    path = write(tmp_path / "x.fa", ">a\nACGT\nACGU\n")
    with pytest.raises(DataError) as info:
        read_fasta(path)
    check_error(info.value, path, 3, "'U' at position 4")


def test_read_fasta_empty_file(tmp_path):
    path = write(tmp_path / "x.fa", "\n\n")
    with pytest.raises(DataError) as info:
        read_fasta(path)
    check_error(info.value, path, None, "empty")


def test_read_fasta_rejects_bad_arguments(tmp_path):
    path = write(tmp_path / "x.fa", ">a\nAC\n")
    with pytest.raises(ValueError, match="labels_from"):
        read_fasta(path, labels_from="name")
    with pytest.raises(ValueError, match="at least one path"):
        read_fasta([])


# --------------------------------------------------------------------------- Genomic Benchmarks


def test_genomic_benchmarks_csv_layout(tmp_path):
    write(tmp_path / "train" / "positive.csv.gz", "id,seq\n0,ACGT\n1,CCCC\n")
    write(tmp_path / "train" / "negative.csv", "sequence,other\nGGGG,x\n")
    write(tmp_path / "test" / "positive.csv", "seq\nTTTT\n")
    write(tmp_path / "test" / "negative.csv", "seq\nAAAA\n")
    train = read_genomic_benchmarks(tmp_path)
    assert train.label_names == ("negative", "positive")
    assert train.sequences == ("GGGG", "ACGT", "CCCC")
    assert train.labels.tolist() == [0, 1, 1]
    test = read_genomic_benchmarks(tmp_path, split="test")
    assert test.class_counts() == {"negative": 1, "positive": 1}


def test_genomic_benchmarks_folder_layout(tmp_path):
    for index, sequence in enumerate(
        ["AAAA", "CCCC", "GGGG", "TTTT", "ACAC", "GTGT", "AAAC", "AAAG", "AAAT", "CCCA", "CCCG"]
    ):
        write(tmp_path / "train" / "positive" / f"{index}.txt", sequence + "\n")
    write(tmp_path / "train" / "negative" / "0.txt", "acgt\nAC\n")
    dataset = read_genomic_benchmarks(tmp_path)
    assert dataset.label_names == ("negative", "positive")
    assert dataset.sequences[0] == "ACGTAC"
    # Numbered files are read in numeric order: 0, 1, ..., 9, 10.
    assert dataset.sequences[-2:] == ("CCCA", "CCCG")
    assert dataset.class_counts() == {"negative": 1, "positive": 11}


def test_genomic_benchmarks_bad_txt_names_file_and_line(tmp_path):
    write(tmp_path / "train" / "positive" / "0.txt", "ACGT\n")
    bad = write(tmp_path / "train" / "negative" / "3.txt", "ACGT\nACJT\n")
    with pytest.raises(DataError) as info:
        read_genomic_benchmarks(tmp_path)
    check_error(info.value, bad, 2, "'J' at position 3")


def test_genomic_benchmarks_table_without_sequence_column(tmp_path):
    table = write(tmp_path / "train" / "positive.csv", "id,region,start,end\n0,chr1,1,5\n")
    with pytest.raises(DataError) as info:
        read_genomic_benchmarks(tmp_path)
    check_error(info.value, table, 1, "'seq' or 'sequence'", "'region'")


def test_genomic_benchmarks_layout_errors(tmp_path):
    write(tmp_path / "train" / "positive.csv", "seq\nACGT\n")
    with pytest.raises(DataError) as info:
        read_genomic_benchmarks(tmp_path, split="test")
    check_error(info.value, tmp_path, None, "'test'", "train")
    write(tmp_path / "train" / "negative" / "0.txt", "ACGT\n")
    with pytest.raises(DataError) as info:
        read_genomic_benchmarks(tmp_path)
    check_error(info.value, tmp_path / "train", None, "both")
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError) as info:
        read_genomic_benchmarks(tmp_path, split="test")
    check_error(info.value, tmp_path / "test", None, "no class tables")


# --------------------------------------------------------------------------- load_dataset


def test_load_dataset_detects_formats(tmp_path):
    table = write(tmp_path / "t.tsv.gz", "sequence\tlabel\nACGT\t1\n")
    assert load_dataset(table).sequences == ("ACGT",)

    fasta = write(tmp_path / "f.fa", ">x label=1\nAC\n>y label=0\nGT\n")
    assert load_dataset(fasta).labels.tolist() == [1, 0]

    fasta_dir = tmp_path / "fasta_dir"
    write(fasta_dir / "pos.fa", ">x\nAC\n")
    write(fasta_dir / "neg.fasta.gz", ">y\nGT\n")
    write(fasta_dir / "README.md", "not data\n")
    by_file = load_dataset(fasta_dir)
    assert by_file.label_names == ("neg", "pos")
    assert by_file.labels.tolist() == [0, 1]

    benchmark = tmp_path / "bench"
    write(benchmark / "train" / "a.csv", "seq\nAAAA\n")
    write(benchmark / "test" / "a.csv", "seq\nCCCC\n")
    assert load_dataset(benchmark).sequences == ("AAAA",)
    assert load_dataset(benchmark, split="test").sequences == ("CCCC",)


def test_load_dataset_errors(tmp_path):
    missing = tmp_path / "missing.csv"
    with pytest.raises(DataError) as info:
        load_dataset(missing)
    check_error(info.value, missing, None, "not found")
    unknown = write(tmp_path / "x.json", "{}")
    with pytest.raises(DataError) as info:
        load_dataset(unknown)
    check_error(info.value, unknown, None, "unsupported", ".csv", ".fasta")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError) as info:
        load_dataset(empty_dir)
    check_error(info.value, empty_dir, None, "Genomic Benchmarks", "FASTA")
    table = write(tmp_path / "t.csv", "sequence,label\nA,1\n")
    with pytest.raises(DataError) as info:
        load_dataset(table, split="test")
    check_error(info.value, table, None, "split=")


# --------------------------------------------------------------------------- splitting


def test_train_test_split_is_stratified_and_deterministic():
    labels = [0] * 60 + [1] * 40
    dataset = make_dataset(labels)
    train, test = train_test_split(dataset, 0.25, seed=3)
    assert test.class_counts() == {"neg": 15, "pos": 10}
    assert train.class_counts() == {"neg": 45, "pos": 30}
    assert sorted(train.sequences + test.sequences) == sorted(dataset.sequences)
    again_train, again_test = train_test_split(dataset, 0.25, seed=3)
    assert again_test.sequences == test.sequences
    assert again_train.sequences == train.sequences
    _, other_test = train_test_split(dataset, 0.25, seed=4)
    assert other_test.sequences != test.sequences


def test_train_test_split_keeps_original_order():
    dataset = make_dataset([0, 1] * 20)
    train, test = train_test_split(dataset, 0.3, seed=0)
    position = {sequence: i for i, sequence in enumerate(dataset.sequences)}
    assert [position[s] for s in train.sequences] == sorted(position[s] for s in train.sequences)
    assert [position[s] for s in test.sequences] == sorted(position[s] for s in test.sequences)


def test_train_test_split_rejects_bad_fraction():
    dataset = make_dataset([0, 1, 0, 1])
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="test_fraction"):
            train_test_split(dataset, fraction, seed=0)
    with pytest.raises(ValueError, match="empty"):
        train_test_split(dataset, 0.01, seed=0)


# --------------------------------------------------------------------------- bundled data


def test_bundled_files_exist():
    folder = bundled_data_dir()
    assert folder.name == BUNDLED_DATA
    for name in ("train.csv", "test.csv", "PROVENANCE.md", "LICENSE", "make_split.py"):
        assert (folder / name).is_file(), name


def test_bundled_data_counts_and_stratification():
    train, test = load_bundled("train"), load_bundled("test")
    assert len(train) + len(test) == 5919
    assert len(test) == 888
    assert train.label_names == test.label_names == ("0", "1")
    assert set(train.sequences[0]) <= set("ACGT") and len(train.sequences[0]) == 70
    total_positive = train.class_counts()["1"] + test.class_counts()["1"]
    assert total_positive == 2915
    overall = total_positive / 5919
    for part in (train, test):
        assert min(part.class_counts().values()) > 0
        assert abs(part.class_counts()["1"] / len(part) - overall) < 0.01
    assert abs(len(test) / 5919 - 0.15) < 0.01


def test_load_bundled_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_bundled("validation")


def _load_make_split():
    script = bundled_data_dir() / "make_split.py"
    spec = importlib.util.spec_from_file_location("make_split", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_split_matches_train_test_split():
    make_split = _load_make_split()
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, size=500)
    dataset = SequenceDataset(tuple(f"{'ACGT'[i % 4]}{i}" for i in range(500)), labels, ("a", "b", "c"), "memory")
    for seed in (0, 1):
        _, test = train_test_split(dataset, make_split.TEST_FRACTION, seed)
        mask = make_split.stratified_test_mask(labels, make_split.TEST_FRACTION, seed)
        assert test.sequences == tuple(np.array(dataset.sequences)[mask])
    assert (make_split.SEED, make_split.TEST_FRACTION) == (0, 0.15)


@pytest.mark.skipif(not PROMOTER_SOURCE.is_file(), reason="source promoters.csv not available")
def test_bundled_split_reproduces_from_source():
    source = read_csv(PROMOTER_SOURCE)
    train, test = train_test_split(source, 0.15, seed=0)
    assert train.sequences == load_bundled("train").sequences
    assert test.sequences == load_bundled("test").sequences
    assert test.labels.tolist() == load_bundled("test").labels.tolist()
