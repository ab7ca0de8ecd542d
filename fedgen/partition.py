"""Split a labelled data set among simulated federated sites.

Every partitioner takes the class label of each sample and returns one sorted
int64 index array per site. The arrays are disjoint, together cover every
sample, and depend only on the labels, the arguments and ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SCHEMES = ("iid", "label-skew", "dirichlet")
MAX_DIRICHLET_DRAWS = 1000

Labels = Sequence[int] | np.ndarray


def _check_labels(labels: Labels, n_sites: int) -> np.ndarray:
    label_array = np.asarray(labels)
    if label_array.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {label_array.shape}")
    if label_array.size and not np.issubdtype(label_array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {label_array.dtype}")
    if n_sites < 1:
        raise ValueError(f"n_sites must be at least 1, got {n_sites}")
    if n_sites > len(label_array):
        raise ValueError(
            f"cannot split {len(label_array)} samples among {n_sites} sites: every site needs at least one sample"
        )
    return label_array


def partition_iid(labels: Labels, n_sites: int, seed: int) -> list[np.ndarray]:
    """Deal samples to sites at random, keeping sizes and class mixes equal.

    Samples are shuffled, grouped by class and dealt round-robin, so site sizes
    differ by at most one and so do the per-class counts of any two sites.
    """
    label_array = _check_labels(labels, n_sites)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(label_array))
    # Stable sort by class keeps the random order within each class.
    dealing_order = shuffled[np.argsort(label_array[shuffled], kind="stable")]
    site_of_slot = np.arange(len(dealing_order)) % n_sites
    return [np.sort(dealing_order[site_of_slot == site]).astype(np.int64) for site in range(n_sites)]


def partition_label_skew(labels: Labels, n_sites: int, seed: int, classes_per_site: int = 1) -> list[np.ndarray]:
    """Give each site samples of only ``classes_per_site`` classes.

    With classes ``c_0 < c_1 < ...`` (``C`` in all), site ``s`` holds classes
    ``c_((s * classes_per_site + j) mod C)`` for ``j < classes_per_site``, i.e.
    classes are handed out round-robin. Each class's samples are shuffled and
    split evenly among the sites holding it. For 2 classes and 3 sites with one
    class each, sites 0 and 2 share class ``c_0`` and site 1 has all of ``c_1``.
    Which site holds which class does not depend on ``seed``; the seed only
    decides how shared classes are divided.

    Raises
    ------
    ValueError
        ``classes_per_site`` outside ``1..C``; ``n_sites * classes_per_site < C``
        (some class would have no site); or a site ends up empty because a
        class has fewer samples than sites holding it.
    """
    label_array = _check_labels(labels, n_sites)
    classes = np.unique(label_array)
    if not 1 <= classes_per_site <= len(classes):
        raise ValueError(
            f"classes_per_site must be between 1 and the number of classes ({len(classes)}), got {classes_per_site}"
        )
    if n_sites * classes_per_site < len(classes):
        raise ValueError(
            f"{n_sites} sites with {classes_per_site} class(es) each cannot hold all "
            f"{len(classes)} classes; use classes_per_site >= "
            f"{math.ceil(len(classes) / n_sites)}"
        )
    holders: list[list[int]] = [[] for _ in classes]
    for site in range(n_sites):
        for offset in range(classes_per_site):
            holders[(site * classes_per_site + offset) % len(classes)].append(site)

    rng = np.random.default_rng(seed)
    site_parts: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    for class_value, class_holders in zip(classes, holders):
        members = rng.permutation(np.flatnonzero(label_array == class_value))
        for site, part in zip(class_holders, np.array_split(members, len(class_holders))):
            site_parts[site].append(part)
    sites = [np.sort(np.concatenate(parts)).astype(np.int64) for parts in site_parts]
    for site, indices in enumerate(sites):
        if len(indices) == 0:
            raise ValueError(
                f"site {site} received no samples: its classes have fewer samples "
                f"than sites sharing them; use fewer sites or more classes_per_site"
            )
    return sites


def partition_dirichlet(labels: Labels, n_sites: int, alpha: float, seed: int, min_size: int = 10) -> list[np.ndarray]:
    """Split each class among sites in Dirichlet(``alpha``) proportions.

    For every class a proportion vector is drawn from a symmetric Dirichlet
    distribution and the class's shuffled samples are cut accordingly. Small
    ``alpha`` concentrates each class on few sites; large ``alpha`` approaches
    an even split. The whole draw is repeated until every site has at least
    ``min_size`` samples, at most ``MAX_DIRICHLET_DRAWS`` times.

    Raises
    ------
    ValueError
        ``alpha <= 0``, ``min_size < 1``, fewer than ``n_sites * min_size``
        samples, or no acceptable draw within ``MAX_DIRICHLET_DRAWS``.
    """
    label_array = _check_labels(labels, n_sites)
    if not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1, got {min_size}")
    if n_sites * min_size > len(label_array):
        raise ValueError(f"{len(label_array)} samples cannot give {n_sites} sites at least {min_size} samples each")
    rng = np.random.default_rng(seed)
    class_members = [np.flatnonzero(label_array == c) for c in np.unique(label_array)]
    for _ in range(MAX_DIRICHLET_DRAWS):
        site_parts: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
        for members in class_members:
            shuffled = rng.permutation(members)
            proportions = rng.dirichlet(np.full(n_sites, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
            for site, part in enumerate(np.split(shuffled, cuts)):
                site_parts[site].append(part)
        sites = [np.sort(np.concatenate(parts)).astype(np.int64) for parts in site_parts]
        if min(len(indices) for indices in sites) >= min_size:
            return sites
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_DIRICHLET_DRAWS} gave all {n_sites} "
        f"sites at least {min_size} samples; raise alpha, lower min_size or use fewer sites"
    )


def partition(labels: Labels, n_sites: int, scheme: str, seed: int, alpha: float = 0.5) -> list[np.ndarray]:
    """Partition by scheme name.

    ``"iid"``, ``"label-skew"`` (one class per site) or ``"dirichlet"``;
    ``alpha`` is used only by ``"dirichlet"``.
    """
    if scheme == "iid":
        return partition_iid(labels, n_sites, seed)
    if scheme == "label-skew":
        return partition_label_skew(labels, n_sites, seed)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, n_sites, alpha, seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
