import numpy as np
import pytest
import torch

from fedgen.params import arrays_to_record, digest, load_trainable, record_to_arrays


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
