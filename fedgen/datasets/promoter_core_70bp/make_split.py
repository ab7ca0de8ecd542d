"""Recreate ``train.csv`` and ``test.csv`` in this folder from ``promoters.csv``.

Usage::

    python make_split.py path/to/promoters.csv

The split is stratified by label, 15% test, seed 0. It uses only the standard
library and numpy, and reproduces ``fedgen.data.train_test_split`` exactly
(the project's tests check this): per class in ascending label order, the
class's row indices are permuted with one ``numpy.random.default_rng(seed)``
and the first ``round(n_class * 0.15)`` (halves up) go to the test set. Rows
keep their original order in both files.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

SEED = 0
TEST_FRACTION = 0.15
HEADER = ("sequence", "label")


def stratified_test_mask(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the rows that go to the test set."""
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_test = int(np.floor(len(members) * test_fraction + 0.5))
        is_test[rng.permutation(members)[:n_test]] = True
    return is_test


def write_rows(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="promoters.csv with columns sequence,label")
    args = parser.parse_args()

    with open(args.source, newline="", encoding="utf-8") as stream:
        rows = [(row["sequence"], row["label"]) for row in csv.DictReader(stream)]
    labels = np.array([int(label) for _, label in rows], dtype=np.int64)
    is_test = stratified_test_mask(labels, TEST_FRACTION, SEED)

    out_dir = Path(__file__).resolve().parent
    write_rows(out_dir / "train.csv", [row for row, test in zip(rows, is_test) if not test])
    write_rows(out_dir / "test.csv", [row for row, test in zip(rows, is_test) if test])
    print(f"train.csv: {int((~is_test).sum())} rows, test.csv: {int(is_test.sum())} rows")


if __name__ == "__main__":
    main()
