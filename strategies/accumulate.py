"""A weighted running mean over named arrays, fed one update at a time.

Mean-based aggregation (FedAvg, FedProx, and the mean FedAdam steps from) needs only a
running sum: adding each site's update as its reply arrives keeps the aggregator's
memory at the accumulator plus the one update in hand, whatever the number of sites,
where collecting every reply first holds all K of them.

Accumulation is in float32 for float32 updates (``dtype`` overrides it). Flower's own
FedAvg averages in the updates' dtype too, so fedgen's result does not change in
precision; the rounding of a float32 running sum grows at worst like K x 6e-8 relative
(6e-6 at K = 100), far below the noise DP-SGD puts into every update, and it keeps the
accumulator the size of one update; float64 would double it for precision the noise
already hides.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class RunningMean:
    """Weighted mean of named arrays, updated in place as each update arrives.

    Parameters
    ----------
    dtype : numpy dtype, optional
        Accumulator dtype; default: the first update's floating dtype (float32 at least).

    Examples
    --------
    >>> mean = RunningMean()
    >>> mean.add({"w": np.ones(2, np.float32)}, weight=1)
    >>> mean.add({"w": np.zeros(2, np.float32)}, weight=3)
    >>> mean.result()["w"]
    array([0.25, 0.25], dtype=float32)
    """

    def __init__(self, dtype: np.dtype | type | None = None) -> None:
        self._dtype = None if dtype is None else np.dtype(dtype)
        self._sums: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._out_dtypes: dict[str, np.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        """Add one update with ``weight`` (e.g. its number of examples).

        Raises
        ------
        ValueError
            A non-positive or non-finite weight, or names or shapes that differ from the
            first update's.
        """
        if not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"update weight must be a positive finite number, got {weight!r}")
        if self.count == 0:
            self._start(arrays)
        elif set(arrays) != set(self._sums):
            missing, extra = sorted(set(self._sums) - set(arrays)), sorted(set(arrays) - set(self._sums))
            raise ValueError(f"update names differ from the first update's: missing {missing}, extra {extra}")
        for name, array in arrays.items():  # all checked before any sum changes
            if array.shape != self._shapes[name]:
                raise ValueError(f"{name}: shape {array.shape} differs from the first update's {self._shapes[name]}")
        for name, array in arrays.items():
            # In place, one array at a time: the only temporary is one array's weighted copy.
            self._sums[name] += np.multiply(array, weight, dtype=self._sums[name].dtype)
        self.total_weight += float(weight)
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean so far, in each array's original dtype.

        Raises
        ------
        ValueError
            Before any update was added.
        """
        self._require_updates()
        return {
            name: (total / self.total_weight).astype(self._out_dtypes[name], copy=False)
            for name, total in self._sums.items()
        }

    def take(self) -> dict[str, np.ndarray]:
        """The weighted mean, computed in place in the accumulator, which it empties:
        `result` without a second copy of the update. Read ``total_weight`` first.

        Raises
        ------
        ValueError
            Before any update was added.
        """
        self._require_updates()
        sums, total = self._sums, self.total_weight
        means = {}
        for name in list(sums):
            mean = sums.pop(name)  # let go of each sum as soon as its mean is handed on
            np.divide(mean, total, out=mean)
            means[name] = mean.astype(self._out_dtypes[name], copy=False)
        self.__init__(self._dtype)
        return means

    def _require_updates(self) -> None:
        if self.count == 0:
            raise ValueError("no update was added: there is no mean")

    def _start(self, arrays: Mapping[str, np.ndarray]) -> None:
        if not arrays:
            raise ValueError("an update must hold at least one array")
        for name, array in arrays.items():
            if not np.issubdtype(array.dtype, np.floating):
                raise ValueError(f"{name}: dtype {array.dtype} is not floating point; only weights are averaged")
        for name, array in arrays.items():
            self._sums[name] = np.zeros(array.shape, dtype=self._dtype or np.promote_types(array.dtype, np.float32))
            self._shapes[name] = array.shape
            self._out_dtypes[name] = array.dtype
