import numpy as np
import pytest

from fedgen.strategies.accumulate import RunningMean


def _updates(count: int, seed: int = 0, dtype=np.float32) -> list[tuple[dict[str, np.ndarray], float]]:
    rng = np.random.default_rng(seed)
    return [
        (
            {"layer.weight": rng.normal(size=(7, 5)).astype(dtype), "layer.bias": rng.normal(size=5).astype(dtype)},
            float(rng.integers(1, 500)),
        )
        for _ in range(count)
    ]


def _numpy_mean(updates, name: str) -> np.ndarray:
    stacked = np.stack([u[name].astype(np.float64) for u, _ in updates])
    return np.average(stacked, axis=0, weights=[w for _, w in updates])


@pytest.mark.parametrize("count", [1, 3, 100])
@pytest.mark.parametrize("dtype", [None, np.float64])
def test_running_mean_equals_numpys_weighted_mean(count, dtype):
    updates = _updates(count)
    mean = RunningMean(dtype=dtype)
    for arrays, weight in updates:
        mean.add(arrays, weight)
    result = mean.result()
    assert mean.count == count and mean.total_weight == sum(w for _, w in updates)
    for name in ("layer.weight", "layer.bias"):
        assert result[name].dtype == np.float32  # handed back in the updates' dtype
        # float32 accumulation rounds at ~K x 6e-8 relative; float64 only at the final cast.
        np.testing.assert_allclose(
            result[name], _numpy_mean(updates, name), rtol=1e-5 if dtype is None else 1e-6, atol=1e-6
        )


def test_float64_updates_accumulate_in_float64():
    updates = _updates(10, dtype=np.float64)
    mean = RunningMean()
    for arrays, weight in updates:
        mean.add(arrays, weight)
    np.testing.assert_allclose(mean.result()["layer.bias"], _numpy_mean(updates, "layer.bias"), rtol=1e-13)
    assert mean.result()["layer.bias"].dtype == np.float64


def test_equal_weights_give_the_plain_mean():
    mean = RunningMean()
    for value in (1.0, 2.0, 6.0):
        mean.add({"w": np.full(3, value, np.float32)}, weight=4)
    np.testing.assert_array_equal(mean.result()["w"], np.full(3, 3.0, np.float32))


def test_mismatched_update_is_refused_and_leaves_the_sum_unchanged():
    mean = RunningMean()
    mean.add({"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)}, weight=1)
    with pytest.raises(ValueError, match="b: shape \\(4,\\) differs"):
        mean.add({"a": np.full(2, 9, np.float32), "b": np.ones(4, np.float32)}, weight=1)
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        mean.add({"a": np.ones(2, np.float32)}, weight=1)
    assert mean.count == 1
    np.testing.assert_array_equal(mean.result()["a"], np.ones(2, np.float32))


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf")])
def test_bad_weight_is_refused(weight):
    with pytest.raises(ValueError, match="positive finite"):
        RunningMean().add({"w": np.ones(1, np.float32)}, weight)


def test_integer_arrays_and_empty_mean_are_refused():
    with pytest.raises(ValueError, match="not floating point"):
        RunningMean().add({"steps": np.ones(1, np.int64)}, 1)
    with pytest.raises(ValueError, match="no update was added"):
        RunningMean().result()


def test_take_gives_the_mean_in_the_accumulator_and_empties_it():
    updates = _updates(5)
    mean = RunningMean()
    for arrays, weight in updates:
        mean.add(arrays, weight)
    expected = mean.result()
    sums = dict(mean._sums)
    taken = mean.take()
    for name in expected:
        np.testing.assert_array_equal(taken[name], expected[name])
        assert np.shares_memory(taken[name], sums[name])  # divided in place: no second copy
    assert mean.count == 0 and mean.total_weight == 0
    with pytest.raises(ValueError, match="no update"):
        mean.take()
