"""Genome sequence data readers with strict validation.

Every reader returns a :class:`SequenceDataset` of upper-case DNA strings and
integer class labels. Malformed input raises :class:`DataError`, whose message
names the file and, where the problem sits on one line, its 1-based line number.

Supported inputs
----------------
* CSV/TSV tables with a header (``.csv``, ``.tsv``, optionally ``.gz``): :func:`read_csv`.
* FASTA files (``.fa``, ``.fasta``, ``.fna``, optionally ``.gz``): :func:`read_fasta`.
* Genomic Benchmarks folders (``root/{train,test}/...``): :func:`read_genomic_benchmarks`.
* Any of the above by inspection of the path: :func:`load_dataset`.
* The bundled core-promoter data set: :func:`load_bundled`.
"""

from __future__ import annotations

import csv
import gzip
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, TextIO

import numpy as np

from .errors import FedgenError

ALPHABET = "ACGTN"
TABLE_SUFFIXES = (".csv", ".tsv")
FASTA_SUFFIXES = (".fa", ".fasta", ".fna")
BUNDLED_DATA = "promoter_core_70bp"
SPLITS = ("train", "test")

PathLike = str | Path

_INVALID_BASE = re.compile(f"[^{ALPHABET}]")
_INTEGER = re.compile(r"[+-]?\d+")
# `label=X` anywhere in a FASTA header, delimited by whitespace, '|' or ';'.
_HEADER_LABEL_TOKEN = re.compile(r"(?:^|[\s|;])label=([^\s|;]+)")
_GENOMIC_BENCHMARKS_SEQUENCE_COLUMNS = ("seq", "sequence")


class DataError(FedgenError, ValueError):
    """Invalid or unreadable input data.

    Parameters
    ----------
    path
        File or directory the problem was found in.
    message
        What is wrong, without the location.
    line
        1-based line number of the offending line, when there is one.

    Attributes
    ----------
    path : str
        File or directory the problem was found in.
    line : int or None
        1-based line number, or ``None`` when the problem concerns the whole file.
    """

    def __init__(self, path: PathLike, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        # The problem without the file's path, for messages that must not reveal it.
        self.reason = message if line is None else f"line {line}: {message}"
        location = self.path if line is None else f"{self.path}, line {line}"
        super().__init__(f"{location}: {message}")


@dataclass(frozen=True, eq=False, repr=False)
class SequenceDataset:
    """Labelled DNA sequences.

    Attributes
    ----------
    sequences : tuple of str
        Upper-case sequences over ``A, C, G, T, N``.
    labels : numpy.ndarray
        Read-only int64 array; ``labels[i]`` indexes ``label_names``.
    label_names : tuple of str
        ``label_names[j]`` is the name of label ``j``.
    source : str
        Where the data came from (a path or a description), for messages.
    """

    sequences: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        given = np.asarray(self.labels)
        if given.size and not np.issubdtype(given.dtype, np.integer):
            raise TypeError(f"labels must be integers, got dtype {given.dtype}")
        # A copy, so that freezing it leaves the caller's array writable.
        labels = np.array(given, dtype=np.int64)
        if labels.ndim != 1 or len(labels) != len(self.sequences):
            raise ValueError(
                f"labels must be a 1-D array with one entry per sequence "
                f"({len(self.sequences)}), got shape {labels.shape}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise ValueError(f"labels must lie in [0, {len(self.label_names)}) to index label_names")
        labels.flags.writeable = False
        object.__setattr__(self, "sequences", tuple(self.sequences))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", tuple(self.label_names))

    def __len__(self) -> int:
        return len(self.sequences)

    def __repr__(self) -> str:
        return f"SequenceDataset(n={len(self)}, classes={self.class_counts()}, source={self.source!r})"

    def subset(self, indices: Sequence[int] | np.ndarray) -> SequenceDataset:
        """Samples at ``indices`` (integers or a boolean mask); all label names are kept."""
        index_array = np.asarray(indices)
        if index_array.dtype == bool:
            index_array = np.flatnonzero(index_array)
        elif index_array.size == 0:
            index_array = index_array.astype(np.int64)
        elif not np.issubdtype(index_array.dtype, np.integer):
            raise TypeError(f"indices must be integers or a boolean mask, got {index_array.dtype}")
        return SequenceDataset(
            sequences=tuple(self.sequences[i] for i in index_array),
            labels=self.labels[index_array],
            label_names=self.label_names,
            source=self.source,
        )

    def with_label_names(self, label_names: Sequence[str]) -> SequenceDataset:
        """The same samples indexed by ``label_names`` (e.g. a federation's agreed classes).

        Raises
        ------
        DataError
            If a label present in this data set is not among ``label_names``.
        """
        names = tuple(str(name) for name in label_names)
        present = {self.label_names[i] for i in np.unique(self.labels)}
        unknown = sorted(present - set(names))
        if unknown:
            raise DataError(self.source, f"labels {unknown} are not among the expected labels {list(names)}")
        position = {name: i for i, name in enumerate(names)}
        remap = np.array([position.get(name, -1) for name in self.label_names], dtype=np.int64)
        return SequenceDataset(self.sequences, remap[self.labels], names, self.source)

    def class_counts(self) -> dict[str, int]:
        """Number of samples per label name, in label order (zero counts included)."""
        counts = np.bincount(self.labels, minlength=len(self.label_names))
        return {name: int(count) for name, count in zip(self.label_names, counts)}


class _Record(NamedTuple):
    """One parsed sequence, with where its label came from for error messages."""

    path: Path
    line: int | None
    sequence: str
    label: str


# --------------------------------------------------------------------------- helpers


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    name = path.name.lower()
    name = name.removesuffix(".gz")
    return name.endswith(suffixes)


def _require_file(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "is not a regular file")


@contextmanager
def _open_text(path: Path) -> Iterator[TextIO]:
    """Open a plain or gzip-compressed UTF-8 text file; decoding failures become DataError.

    A leading byte-order mark (as written by some spreadsheet programs) is skipped.
    """
    _require_file(path)
    try:
        if path.name.lower().endswith(".gz"):
            stream: TextIO = gzip.open(path, "rt", encoding="utf-8-sig", newline="")
        else:
            stream = open(path, encoding="utf-8-sig", newline="")
        with stream:
            yield stream
    except UnicodeDecodeError as error:
        raise DataError(path, f"is not UTF-8 text ({error.reason})") from error
    except (gzip.BadGzipFile, EOFError) as error:
        raise DataError(path, f"is not a valid gzip file ({error})") from error


def _check_bases(path: Path, text: str, line: int) -> str:
    """Return ``text`` upper-cased, or raise if it has a character outside ACGTN."""
    sequence = text.upper()
    invalid = _INVALID_BASE.search(sequence)
    if invalid is not None:
        position = invalid.start()
        raise DataError(
            path,
            f"character {text[position]!r} at position {position + 1} is not one of {', '.join(ALPHABET)}",
            line,
        )
    return sequence


def _read_table(path: Path, sequence_columns: Sequence[str], label_column: str | None) -> list[_Record]:
    """Read a delimited table with a header.

    The sequence is taken from the first of ``sequence_columns`` present in the
    header. With ``label_column=None`` records get an empty label.
    """
    delimiter = "\t" if _has_suffix(path, (".tsv",)) else ","
    records = []
    with _open_text(path) as stream:
        reader = csv.reader(stream, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(path, "file is empty; expected a header line")
            header = [name.strip() for name in header]
            found = ", ".join(repr(name) for name in header)
            sequence_column = next((c for c in sequence_columns if c in header), None)
            if sequence_column is None:
                wanted = " or ".join(repr(c) for c in sequence_columns)
                raise DataError(path, f"no column {wanted} in the header (columns found: {found})", 1)
            if label_column is not None and label_column not in header:
                raise DataError(path, f"no column {label_column!r} in the header (columns found: {found})", 1)
            sequence_index = header.index(sequence_column)
            label_index = None if label_column is None else header.index(label_column)

            for row in reader:
                line = reader.line_num
                if not any(field.strip() for field in row):
                    continue  # blank line
                sequence = row[sequence_index].strip() if sequence_index < len(row) else ""
                if not sequence:
                    raise DataError(path, f"empty sequence in column {sequence_column!r}", line)
                label = ""
                if label_index is not None:
                    label = row[label_index].strip() if label_index < len(row) else ""
                    if not label:
                        raise DataError(path, f"missing label in column {label_column!r}", line)
                records.append(_Record(path, line, _check_bases(path, sequence, line), label))
        except csv.Error as error:
            raise DataError(path, f"malformed table: {error}", reader.line_num) from error
    if not records:
        raise DataError(path, "no data rows after the header")
    return records


def _index_labels(records: Sequence[_Record], label_names: Sequence[str] | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map string labels to indices.

    Given ``label_names``, a label's index is its position there and any other
    label is an error. Otherwise integer labels are ordered by value and
    named by their decimal form, and other labels are sorted as strings.
    """
    if label_names is not None:
        names = tuple(str(name) for name in label_names)
        if len(set(names)) != len(names):
            raise ValueError(f"label_names has duplicates: {names}")
        index_of = {name: index for index, name in enumerate(names)}
        for record in records:
            if record.label not in index_of:
                raise DataError(
                    record.path,
                    f"label {record.label!r} is not one of {', '.join(names)}",
                    record.line,
                )
    else:
        distinct = {record.label for record in records}
        if all(_INTEGER.fullmatch(label) for label in distinct):
            values = sorted({int(label) for label in distinct})
            names = tuple(str(value) for value in values)
            position = {value: index for index, value in enumerate(values)}
            index_of = {label: position[int(label)] for label in distinct}
        else:
            names = tuple(sorted(distinct))
            index_of = {name: index for index, name in enumerate(names)}
    labels = np.fromiter((index_of[r.label] for r in records), dtype=np.int64, count=len(records))
    return labels, names


def _build_dataset(records: Sequence[_Record], label_names: Sequence[str] | None, source: str) -> SequenceDataset:
    labels, names = _index_labels(records, label_names)
    return SequenceDataset(tuple(r.sequence for r in records), labels, names, source)


# --------------------------------------------------------------------------- readers


def read_csv(
    path: PathLike,
    *,
    sequence_column: str = "sequence",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> SequenceDataset:
    """Read labelled sequences from a CSV or TSV table with a header line.

    Parameters
    ----------
    path
        ``.csv`` (comma) or ``.tsv`` (tab) file, optionally gzip-compressed (``.gz``).
    sequence_column, label_column
        Header names of the sequence and label columns; other columns are ignored.
    label_names
        Allowed labels in index order. When omitted, labels that are all integers
        are ordered numerically (names ``"0"``, ``"1"``, ...), others alphabetically.

    Returns
    -------
    SequenceDataset

    Raises
    ------
    DataError
        Missing or empty file, missing column, empty sequence, character outside
        ``ACGTN`` (case-insensitive), missing label, or a label not in ``label_names``.
        Blank lines are skipped.
    """
    path = Path(path)
    records = _read_table(path, (sequence_column,), label_column)
    return _build_dataset(records, label_names, str(path))


def _name_without_suffixes(path: Path) -> str:
    """File name without ``.gz`` and one format suffix: ``promoter.fa.gz`` -> ``promoter``."""
    name = path.name
    if name.lower().endswith(".gz"):
        name = name[: -len(".gz")]
    return Path(name).stem


def _label_from_header(header: str) -> str | None:
    token = _HEADER_LABEL_TOKEN.search(header)
    if token is not None:
        return token.group(1)
    if "|" in header:
        return header.rsplit("|", 1)[1].strip() or None
    return None


def _parse_fasta(path: Path) -> list[tuple[int, str, str]]:
    """Return ``(header line number, header text, sequence)`` for each record."""
    records: list[tuple[int, str, str]] = []
    header: str | None = None
    header_line = 0
    chunks: list[str] = []

    def finish_record() -> None:
        if not chunks:
            raise DataError(path, f"header '>{header}' has no sequence", header_line)
        records.append((header_line, header, "".join(chunks)))

    with _open_text(path) as stream:
        for line_number, raw_line in enumerate(stream, start=1):
            text = raw_line.strip()
            if not text:
                continue
            if text.startswith(">"):
                if header is not None:
                    finish_record()
                header, header_line, chunks = text[1:].strip(), line_number, []
            elif header is None:
                raise DataError(path, "sequence line before any '>' header", line_number)
            else:
                chunks.append(_check_bases(path, text, line_number))
    if header is None:
        raise DataError(path, "file is empty; expected FASTA records starting with '>'")
    finish_record()
    return records


def read_fasta(
    paths: PathLike | Sequence[PathLike],
    *,
    labels_from: Literal["file", "header"] = "file",
    label_names: Sequence[str] | None = None,
) -> SequenceDataset:
    """Read labelled sequences from one or more FASTA files.

    Sequences may span several lines; blank lines are ignored. Files may be
    gzip-compressed (``.gz``).

    Parameters
    ----------
    paths
        One path or a list of paths.
    labels_from
        ``"file"``: each file is one class named after the file without its
        ``.gz`` and FASTA suffix (``data/promoter.fa.gz`` -> ``promoter``); files
        with the same name form one class, and classes are sorted by name.
        ``"header"``: the label is the value of a ``label=X`` token in the header
        (separated from other text by whitespace, ``|`` or ``;``), otherwise the
        last ``|``-separated field (``>chr1:100-170|promoter`` -> ``promoter``).
        Labels are then ordered as in :func:`read_csv`.
    label_names
        Allowed labels in index order; only with ``labels_from="header"``.

    Returns
    -------
    SequenceDataset

    Raises
    ------
    DataError
        Missing or empty file, sequence line before the first header, header
        without sequence, character outside ``ACGTN`` (the position counts from
        the start of that line), or, with ``labels_from="header"``, a header
        without a label or a label not in ``label_names``.
    """
    if labels_from not in ("file", "header"):
        raise ValueError(f"labels_from must be 'file' or 'header', got {labels_from!r}")
    if labels_from == "file" and label_names is not None:
        raise ValueError("label_names applies only to labels_from='header'")
    path_list = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not path_list:
        raise ValueError("read_fasta needs at least one path")

    records = []
    for path in path_list:
        for line, header, sequence in _parse_fasta(path):
            if labels_from == "file":
                label = _name_without_suffixes(path)
            else:
                found = _label_from_header(header)
                if found is None:
                    raise DataError(
                        path,
                        f"no label in header '>{header}'; expected a 'label=X' token or a last '|'-separated field",
                        line,
                    )
                label = found
            records.append(_Record(path, line, sequence, label))
    if labels_from == "file":
        label_names = sorted({record.label for record in records})
    return _build_dataset(records, label_names, ", ".join(str(p) for p in path_list))


def _read_text_sequence(path: Path) -> str:
    """Read a file holding one sequence, possibly wrapped over several lines."""
    chunks = []
    with _open_text(path) as stream:
        for line_number, raw_line in enumerate(stream, start=1):
            text = raw_line.strip()
            if text:
                chunks.append(_check_bases(path, text, line_number))
    if not chunks:
        raise DataError(path, "file is empty; expected one sequence")
    return "".join(chunks)


def _natural_key(path: Path) -> tuple[int, int | str]:
    # Numbered files (0.txt, 1.txt, ..., 10.txt) in numeric order, then the rest by name.
    stem = path.name.split(".", 1)[0]
    return (0, int(stem)) if stem.isdigit() else (1, path.name)


def read_genomic_benchmarks(root: PathLike, split: str = "train") -> SequenceDataset:
    """Read one split of a Genomic Benchmarks data set.

    Two layouts are recognised under ``root/<split>/``:

    * ``<class>.csv`` (or ``.tsv``, optionally ``.gz``), one per class, with the
      sequence in a column named ``seq`` or ``sequence``; other columns are ignored.
    * ``<class>/*.txt``, the layout of the ``genomic-benchmarks`` package, one
      sequence per file.

    Class names are sorted; a class's index is its position in that order.

    Raises
    ------
    DataError
        ``root`` or the split folder is missing, the folder holds both or
        neither layout, or any file is invalid.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "not a directory")
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(root, f"no {split!r} split folder (folders found: {', '.join(found) or 'none'})")

    class_tables: dict[str, Path] = {}
    class_dirs: dict[str, Path] = {}
    for entry in sorted(split_dir.iterdir()):
        if entry.is_dir():
            class_dirs[entry.name] = entry
        elif _has_suffix(entry, TABLE_SUFFIXES):
            class_name = _name_without_suffixes(entry)
            if class_name in class_tables:
                raise DataError(
                    split_dir, f"two files for class {class_name!r}: {class_tables[class_name].name} and {entry.name}"
                )
            class_tables[class_name] = entry
    if class_tables and class_dirs:
        raise DataError(
            split_dir, "holds both class tables (<class>.csv) and class folders (<class>/); expected one layout"
        )
    if not class_tables and not class_dirs:
        raise DataError(split_dir, "no class tables (<class>.csv[.gz]) or class folders (<class>/*.txt)")

    records = []
    for class_name, table in sorted(class_tables.items()):
        for record in _read_table(table, _GENOMIC_BENCHMARKS_SEQUENCE_COLUMNS, None):
            records.append(record._replace(label=class_name))
    for class_name, folder in sorted(class_dirs.items()):
        text_files = sorted(folder.glob("*.txt"), key=_natural_key)
        if not text_files:
            raise DataError(folder, "class folder has no .txt sequence files")
        for text_file in text_files:
            records.append(_Record(text_file, None, _read_text_sequence(text_file), class_name))
    return _build_dataset(records, sorted(class_tables or class_dirs), str(split_dir))


def load_dataset(path: PathLike, *, split: str | None = None) -> SequenceDataset:
    """Read a data set, choosing the reader from what ``path`` is.

    * A folder with a ``train/`` (or ``<split>/``) subfolder: Genomic Benchmarks,
      ``split`` defaulting to ``"train"``.
    * A ``.csv``/``.tsv`` file (optionally ``.gz``): :func:`read_csv` with the
      default ``sequence`` and ``label`` columns.
    * A ``.fa``/``.fasta``/``.fna`` file (optionally ``.gz``): :func:`read_fasta`
      with labels from the headers.
    * A folder of FASTA files: :func:`read_fasta`, one class per file.

    ``split`` applies only to Genomic Benchmarks folders.

    Raises
    ------
    DataError
        The path is missing or is none of the above.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "not found")
    if path.is_dir():
        if (path / (split or "train")).is_dir():
            return read_genomic_benchmarks(path, split or "train")
        fasta_files = sorted(p for p in path.iterdir() if p.is_file() and _has_suffix(p, FASTA_SUFFIXES))
        if fasta_files and split is None:
            return read_fasta(fasta_files, labels_from="file")
        raise DataError(
            path,
            "folder is neither a Genomic Benchmarks data set (with "
            f"{split or 'train'}/ inside) nor a folder of FASTA files "
            "(.fa, .fasta, .fna, optionally .gz); split= applies only to Genomic Benchmarks",
        )
    if split is not None:
        raise DataError(path, "split= applies only to Genomic Benchmarks folders, not to files")
    if _has_suffix(path, TABLE_SUFFIXES):
        return read_csv(path)
    if _has_suffix(path, FASTA_SUFFIXES):
        return read_fasta(path, labels_from="header")
    raise DataError(
        path,
        "unsupported file type; supported are .csv and .tsv tables, .fa/.fasta/.fna FASTA "
        "(each optionally .gz), Genomic Benchmarks folders and folders of FASTA files",
    )


def train_test_split(
    dataset: SequenceDataset, test_fraction: float, seed: int
) -> tuple[SequenceDataset, SequenceDataset]:
    """Split a data set into train and test parts, stratified by label.

    Each class contributes ``round(n_class * test_fraction)`` (halves rounded
    up) randomly chosen samples to the test part. Both parts keep the original
    sample order. The split depends only on the labels, ``test_fraction`` and
    ``seed``.

    Returns
    -------
    (train, test) : tuple of SequenceDataset
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test_parts = []
    for label in np.unique(dataset.labels):
        members = np.flatnonzero(dataset.labels == label)
        n_test = int(np.floor(len(members) * test_fraction + 0.5))
        test_parts.append(rng.permutation(members)[:n_test])
    is_test = np.zeros(len(dataset), dtype=bool)
    is_test[np.concatenate(test_parts)] = True
    if is_test.all() or not is_test.any():
        raise ValueError(f"test_fraction={test_fraction} leaves the train or test part of {len(dataset)} samples empty")
    return dataset.subset(~is_test), dataset.subset(is_test)


# --------------------------------------------------------------------------- bundled data


def bundled_data_dir() -> Path:
    """Folder holding the bundled ``train.csv`` and ``test.csv``."""
    return Path(__file__).resolve().parent / "datasets" / BUNDLED_DATA


def load_bundled(split: Literal["train", "test"] = "train") -> SequenceDataset:
    """Load a split of the bundled 70 bp human core-promoter data set.

    Labels: ``"0"`` non-promoter, ``"1"`` core promoter. See ``PROVENANCE.md``
    next to the data for source, license and how the split was made.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return read_csv(bundled_data_dir() / f"{split}.csv", label_names=("0", "1"))
