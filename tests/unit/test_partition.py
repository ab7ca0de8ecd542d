"""Tests for fedgen.partition."""

from __future__ import annotations

import numpy as np
import pytest

from fedgen.partition import (
    MAX_DIRICHLET_DRAWS,
    SCHEMES,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_label_skew,
)

TWO_CLASSES = np.repeat([0, 1], [300, 200])
FOUR_CLASSES = np.repeat([0, 1, 2, 3], 250)


def all_partitioners(labels, n_sites, seed):
    """Each scheme with arguments that are valid for ``labels``."""
    n_classes = len(np.unique(labels))
    return {
        "iid": partition_iid(labels, n_sites, seed),
        "label-skew": partition_label_skew(labels, n_sites, seed, -(-n_classes // n_sites)),
        "dirichlet": partition_dirichlet(labels, n_sites, 0.5, seed),
    }


def assert_valid_partition(sites, n_samples, n_sites):
    assert len(sites) == n_sites
    for indices in sites:
        assert indices.dtype == np.int64
        assert len(indices) > 0
        assert np.all(np.diff(indices) > 0), "indices must be sorted and unique"
    combined = np.concatenate(sites)
    assert len(combined) == n_samples, "sites must be disjoint"
    assert np.array_equal(np.sort(combined), np.arange(n_samples)), "sites must cover all samples"


def class_counts(labels, sites):
    n_classes = labels.max() + 1
    return np.array([np.bincount(labels[s], minlength=n_classes) for s in sites])


def label_skew(labels, sites) -> float:
    """Mean total-variation distance between each site's class mix and the overall mix."""
    overall = np.bincount(labels) / len(labels)
    mixes = class_counts(labels, sites) / np.array([len(s) for s in sites])[:, None]
    return float(np.mean(0.5 * np.abs(mixes - overall).sum(axis=1)))


@pytest.mark.parametrize("labels", [TWO_CLASSES, FOUR_CLASSES], ids=["2 classes", "4 classes"])
@pytest.mark.parametrize("n_sites", [1, 3, 4])
def test_partitions_are_disjoint_sorted_and_cover(labels, n_sites):
    for sites in all_partitioners(labels, n_sites, seed=0).values():
        assert_valid_partition(sites, len(labels), n_sites)


def test_partitions_are_deterministic_and_depend_on_seed():
    # 4 classes on 6 sites: label-skew shares classes 0 and 1 between two sites
    # each, so the seed matters for every scheme.
    first = all_partitioners(FOUR_CLASSES, 6, seed=11)
    again = all_partitioners(FOUR_CLASSES, 6, seed=11)
    other = all_partitioners(FOUR_CLASSES, 6, seed=12)
    for scheme in first:
        assert all(np.array_equal(a, b) for a, b in zip(first[scheme], again[scheme])), scheme
        assert not all(np.array_equal(a, b) for a, b in zip(first[scheme], other[scheme])), scheme


def test_partitions_accept_lists_and_unordered_labels():
    labels = [5, 2, 2, 5, 9, 2, 5, 9, 9, 2] * 10
    for sites in all_partitioners(labels, 3, seed=1).values():
        assert_valid_partition(sites, len(labels), 3)


def test_iid_balances_sizes_and_classes():
    sites = partition_iid(TWO_CLASSES, 3, seed=0)
    sizes = [len(s) for s in sites]
    assert max(sizes) - min(sizes) <= 1
    counts = class_counts(TWO_CLASSES, sites)
    assert np.all(counts.max(axis=0) - counts.min(axis=0) <= 1)


def test_label_skew_one_class_per_site_with_two_classes_three_sites():
    sites = partition_label_skew(TWO_CLASSES, 3, seed=0)
    counts = class_counts(TWO_CLASSES, sites)
    assert counts.tolist() == [[150, 0], [0, 200], [150, 0]]


def test_label_skew_classes_per_site():
    sites = partition_label_skew(FOUR_CLASSES, 4, seed=0, classes_per_site=2)
    counts = class_counts(FOUR_CLASSES, sites)
    assert np.all((counts > 0).sum(axis=1) == 2)
    assert (counts[0] > 0).tolist() == [True, True, False, False]
    assert counts.sum(axis=0).tolist() == [250] * 4


def test_label_skew_is_more_skewed_than_iid():
    skewed = partition_label_skew(FOUR_CLASSES, 4, seed=0)
    iid = partition_iid(FOUR_CLASSES, 4, seed=0)
    assert label_skew(FOUR_CLASSES, skewed) > 0.7
    assert label_skew(FOUR_CLASSES, iid) < 0.01


def test_label_skew_errors():
    with pytest.raises(ValueError, match="classes_per_site"):
        partition_label_skew(TWO_CLASSES, 2, seed=0, classes_per_site=3)
    with pytest.raises(ValueError, match="classes_per_site"):
        partition_label_skew(TWO_CLASSES, 2, seed=0, classes_per_site=0)
    with pytest.raises(ValueError, match="cannot hold all 4 classes"):
        partition_label_skew(FOUR_CLASSES, 2, seed=0)
    # Class 1 has a single sample but two holders among 4 sites.
    with pytest.raises(ValueError, match="received no samples"):
        partition_label_skew(np.array([0] * 20 + [1]), 4, seed=0)


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    def skews(alpha):
        return [label_skew(FOUR_CLASSES, partition_dirichlet(FOUR_CLASSES, 5, alpha, seed)) for seed in range(5)]

    small, large = skews(0.1), skews(100.0)
    assert min(small) > max(large)
    assert np.mean(large) < 0.1 < 0.4 < np.mean(small)


def test_dirichlet_respects_min_size():
    for seed in range(10):
        sites = partition_dirichlet(TWO_CLASSES, 4, 0.1, seed, min_size=40)
        assert min(len(s) for s in sites) >= 40
        assert_valid_partition(sites, len(TWO_CLASSES), 4)


def test_dirichlet_errors():
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(TWO_CLASSES, 3, 0.0, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(TWO_CLASSES, 3, -1.0, seed=0)
    with pytest.raises(ValueError, match="min_size"):
        partition_dirichlet(TWO_CLASSES, 3, 0.5, seed=0, min_size=0)
    with pytest.raises(ValueError, match="at least 200 samples each"):
        partition_dirichlet(TWO_CLASSES, 3, 0.5, seed=0, min_size=200)
    # 165 of 500 per site is barely feasible; tiny alpha essentially never gets there.
    with pytest.raises(ValueError, match=f"in {MAX_DIRICHLET_DRAWS}"):
        partition_dirichlet(TWO_CLASSES, 3, 0.01, seed=0, min_size=165)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_common_argument_errors(scheme):
    with pytest.raises(ValueError, match="n_sites must be at least 1"):
        partition(TWO_CLASSES, 0, scheme, seed=0)
    with pytest.raises(ValueError, match="cannot split 5 samples among 6 sites"):
        partition(np.array([0, 1, 0, 1, 0]), 6, scheme, seed=0)
    with pytest.raises(ValueError, match="integers"):
        partition(np.array([0.0, 1.0, 0.5]), 2, scheme, seed=0)
    with pytest.raises(ValueError, match="one-dimensional"):
        partition(np.zeros((4, 2), dtype=int), 2, scheme, seed=0)


def test_partition_dispatches_by_name():
    for scheme, expected in all_partitioners(TWO_CLASSES, 3, seed=4).items():
        sites = partition(TWO_CLASSES, 3, scheme, seed=4)
        assert all(np.array_equal(a, b) for a, b in zip(sites, expected)), scheme
    with_alpha = partition(TWO_CLASSES, 3, "dirichlet", seed=4, alpha=5.0)
    expected = partition_dirichlet(TWO_CLASSES, 3, 5.0, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(with_alpha, expected))
    with pytest.raises(ValueError, match="iid, label-skew, dirichlet"):
        partition(TWO_CLASSES, 3, "pathological", seed=0)
