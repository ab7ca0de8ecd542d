"""Aggregation strategies by name, built from Flower's own implementations."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from fedgen.protocol import ARRAYS_KEY, CONFIG_KEY, WEIGHT_KEY

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "median": FedMedian,
}

# Options a coordinator may set per strategy, with fedgen's defaults where Flower's
# don't suit a small consortium (FedProx' mu of 0 would be plain FedAvg).
DEFAULT_OPTIONS: dict[str, dict[str, float]] = {
    "fedprox": {"proximal_mu": 0.01},
    "fedadam": {"eta": 1e-2, "eta_l": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedtrimmedavg": {"beta": 0.2},
    "krum": {"num_malicious_nodes": 0},
}


# Strategies whose aggregate is the weighted mean of the updates (FedProx' proximal term
# acts on the sites), and those whose aggregate steps from that mean (FedAdam's
# pseudo-gradient is the mean minus the global model): the aggregator can accumulate the
# mean as replies arrive. Exact types: a subclass or a wrapper may aggregate otherwise.
MEAN_AGGREGATE: tuple[type[Strategy], ...] = (FedAvg, FedProx)
STEPS_FROM_MEAN: tuple[type[Strategy], ...] = (FedAdam,)


def aggregates_by_mean(strategy: Strategy) -> bool:
    """Whether ``strategy`` aggregates a round's updates through their weighted mean alone."""
    return type(strategy) in MEAN_AGGREGATE + STEPS_FROM_MEAN


def mean_is_aggregate(strategy: Strategy) -> bool:
    """Whether ``strategy``'s aggregate of a round's updates is their weighted mean."""
    return type(strategy) in MEAN_AGGREGATE


def strategy_options(name: str) -> list[str]:
    """Names of the options strategy ``name`` accepts beyond sampling and keys."""
    shared = set(inspect.signature(FedAvg.__init__).parameters)
    return sorted(set(inspect.signature(STRATEGIES[name].__init__).parameters) - shared)


def make_strategy(name: str, *, min_sites: int, options: Mapping[str, float] | None = None) -> Strategy:
    """Build strategy ``name`` that trains on every connected site each round, given at
    least ``min_sites`` (the round's quorum) are connected.

    Raises
    ------
    ValueError
        For an unknown strategy or an option the strategy does not take.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    allowed = strategy_options(name)
    unknown = sorted(set(options or {}) - set(allowed))
    if unknown:
        raise ValueError(f"strategy {name!r} takes no option {unknown}; it accepts {allowed or 'none'}")
    kwargs: dict[str, float | int] = {**DEFAULT_OPTIONS.get(name, {}), **(options or {})}
    if "num_malicious_nodes" in kwargs:
        kwargs["num_malicious_nodes"] = int(kwargs["num_malicious_nodes"])
    return STRATEGIES[name](
        fraction_train=1.0,
        # fedgen evaluates the global model at the aggregator, on a held-out set.
        fraction_evaluate=0.0,
        min_train_nodes=min_sites,
        min_available_nodes=min_sites,
        weighted_by_key=WEIGHT_KEY,
        arrayrecord_key=ARRAYS_KEY,
        configrecord_key=CONFIG_KEY,
        **kwargs,
    )
