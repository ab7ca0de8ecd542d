import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedgen.params import PACKED_PREFIX, arrays_to_record, digest, load_trainable, record_to_arrays


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "b.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "a.bias": rng.standard_normal(4).astype(np.float32),
    }


def test_digest_is_stable_and_independent_of_insertion_order():
    arrays = _arrays()
    reordered = dict(reversed(list(arrays.items())))
    assert digest(arrays) == digest(reordered) == digest({k: v.copy() for k, v in arrays.items()})
    assert len(digest(arrays)) == 64


def test_digest_is_independent_of_byte_order_and_memory_layout():
    arrays = _arrays()
    big_endian = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in arrays.items()}
    fortran = {k: np.asfortranarray(v) for k, v in arrays.items()}
    assert digest(big_endian) == digest(arrays) == digest(fortran)


def test_digest_sees_every_change():
    base = digest(_arrays())
    flipped = _arrays()
    flipped["a.bias"].view(np.uint8)[0] ^= 1
    renamed = {("c.bias" if k == "a.bias" else k): v for k, v in _arrays().items()}
    reshaped = {k: (v.reshape(4, 3) if v.ndim == 2 else v) for k, v in _arrays().items()}
    retyped = {k: v.view(np.int32) for k, v in _arrays().items()}
    assert len({base, digest(flipped), digest(renamed), digest(reshaped), digest(retyped)}) == 5


def test_record_round_trip_preserves_names_dtypes_and_values():
    arrays = _arrays()
    back = record_to_arrays(arrays_to_record(arrays))
    assert sorted(back) == sorted(arrays)
    for name in arrays:
        assert back[name].dtype == arrays[name].dtype
        np.testing.assert_array_equal(back[name], arrays[name])


def test_load_trainable_checks_names_and_shapes():
    model = torch.nn.Linear(4, 3)
    good = {"weight": np.ones((3, 4), np.float32), "bias": np.zeros(3, np.float32)}
    load_trainable(model, good)
    assert torch.all(model.weight == 1)
    with pytest.raises(ValueError, match=r"missing \['bias'\]"):
        load_trainable(model, {"weight": good["weight"]})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        load_trainable(model, {**good, "extra": good["bias"]})
    with pytest.raises(ValueError, match="shape"):
        load_trainable(model, {**good, "bias": np.zeros(4, np.float32)})


def test_a_record_travels_as_one_array_whose_key_is_its_layout():
    arrays = _arrays()
    record = arrays_to_record(arrays)
    (key,) = record.keys()
    assert key.startswith(PACKED_PREFIX) and '"a.bias"' in key and len(record) == 1
    # Flower moves each Array of a message (and each of its chunks) as an object of its own.
    assert len(get_all_nested_objects(record)) < len(get_all_nested_objects(_unpacked(arrays)))
    assert digest(record_to_arrays(record)) == digest(arrays)
    mixed = {**arrays, "steps": np.arange(3)}  # one dtype per packed record, else one Array per tensor
    assert set(arrays_to_record(mixed).keys()) == set(mixed)
    assert digest(record_to_arrays(arrays_to_record(mixed))) == digest(mixed)


def test_a_packed_record_aggregates_as_its_tensors_would():
    rng = np.random.default_rng(1)
    updates = [{k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in _arrays().items()} for _ in range(3)]
    replies = [
        RecordDict({"arrays": arrays_to_record(u), "metrics": MetricRecord({"num-examples": n})})
        for u, n in zip(updates, (1, 2, 3))
    ]
    packed = record_to_arrays(aggregate_arrayrecords(replies, "num-examples"))  # Flower's FedAvg mean
    weighted = {k: sum(n * u[k] for u, n in zip(updates, (1, 2, 3))) / 6 for k in updates[0]}
    assert set(packed) == set(weighted)
    for name in weighted:
        np.testing.assert_allclose(packed[name], weighted[name], rtol=1e-6)


@pytest.mark.parametrize(
    "layout, values, problem",
    [
        ('{"tensors":[["a",[2]],["b",[3]]]}', 4, "4 values for a layout of 5"),
        ('{"tensors":[["a",[2]],["a",[2]]]}', 4, "in 2 tensors"),
        ('{"tensors":[["a",[-1]]]}', 1, "does not fit"),
        ('{"tensors":[["a"]]}', 1, "malformed layout"),
        ("not json", 1, "malformed layout"),
    ],
)
def test_a_packed_record_whose_layout_lies_is_refused(layout, values, problem):
    record = ArrayRecord({PACKED_PREFIX + layout: Array(np.zeros(values, np.float32))})
    with pytest.raises(ValueError, match=problem):
        record_to_arrays(record)


def _unpacked(arrays):
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.dtype(">f4"), np.int64])
def test_a_packed_array_is_byte_for_byte_what_flower_would_make(dtype):
    """fedgen writes the packed Array's .npy bytes in one copy; Flower (and a site or an
    aggregator on stock Flower code) must read exactly what its own ``Array(ndarray)``
    holds. Fails when Flower changes how an Array stores a numpy array."""
    arrays = {name: value.astype(dtype) for name, value in _arrays().items()} | {"empty": np.zeros((0, 2), dtype)}
    ((key, packed),) = arrays_to_record(arrays).items()
    flower = Array(np.concatenate([np.ravel(arrays[name]) for name in sorted(arrays)]))
    assert (packed.dtype, packed.shape, packed.stype, packed.data) == (
        flower.dtype,
        flower.shape,
        flower.stype,
        flower.data,
    )
    np.testing.assert_array_equal(packed.numpy(), flower.numpy())  # Flower's own reader


def test_arrays_can_be_read_in_place_without_a_copy():
    record = arrays_to_record(_arrays())
    ((_, packed),) = record.items()
    views = record_to_arrays(record, copy=False)
    copies = record_to_arrays(record)
    for name, value in _arrays().items():
        np.testing.assert_array_equal(views[name], value)
        assert not views[name].flags.writeable and np.shares_memory(views[name], np.frombuffer(packed.data, np.uint8))
        assert copies[name].flags.writeable and not np.shares_memory(copies[name], np.frombuffer(packed.data, np.uint8))
    per_tensor = record_to_arrays(_unpacked(_arrays()), copy=False)
    assert digest(per_tensor) == digest(_arrays())


@pytest.mark.parametrize("copy", [True, False])
def test_array_data_that_is_not_plain_npy_values_is_refused(copy):
    good = Array(np.arange(6, dtype=np.float32))
    short = ArrayRecord(
        {
            PACKED_PREFIX + '{"tensors":[["a",[6]]]}': Array(
                dtype="float32", shape=(6,), stype=good.stype, data=good.data[:-4]
            )
        }
    )
    with pytest.raises(ValueError, match="too short"):
        record_to_arrays(short, copy=copy)
    garbage = ArrayRecord({"a": Array(dtype="float32", shape=(6,), stype=good.stype, data=b"not npy at all")})
    with pytest.raises(ValueError):
        record_to_arrays(garbage, copy=False)
    alien = ArrayRecord({"a": Array(dtype="float32", shape=(6,), stype="torch.Tensor", data=good.data)})
    with pytest.raises((ValueError, TypeError)):
        record_to_arrays(alien, copy=copy)
