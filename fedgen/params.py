"""Trainable tensors <-> Flower records, and the canonical digests of named tensors and of models.

Only trainable tensors travel between site and aggregator. Their digest (`digest`) is
SHA-256 over a canonical encoding (sorted names; for each: name, little-endian dtype,
shape, C-order little-endian bytes), so the same tensors give the same digest in any
process on any platform.

A model, as a checkpoint file holds it, is its tensors *and* the string metadata of the
safetensors header (the model config, the round) that fedgen reads back with them. Its
digest (`model_digest`) covers both, so a checkpoint whose config was edited is a
different model. The header also stores that digest under ``"digest"``, the one entry
the digest does not cover.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType
from torch import nn

NamedArrays = Mapping[str, np.ndarray]
# The safetensors header entry that holds a model file's own digest (not covered by it).
DIGEST_METADATA_KEY = "digest"
_MODEL_DOMAIN = b"fedgen model v1\0"  # a model digest never equals a tensors digest
PACKED_PREFIX = "fedgen.packed.v1 "  # the key of a packed ArrayRecord's one Array, before its layout


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters that require gradients, by name, detached on the CPU."""
    return {name: param.detach().cpu() for name, param in model.named_parameters() if param.requires_grad}


def to_numpy(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy() for name, t in tensors.items()}


def arrays_to_record(arrays: NamedArrays) -> ArrayRecord:
    """Wrap named numpy arrays of one dtype in an `ArrayRecord` holding a single packed
    `Array` (mixed dtypes: one `Array` per tensor, in sorted name order).

    Flower moves every `Array` of a message as objects of their own, each a request
    between processes and a row in the SuperLink's store, so a model of N tensors cost
    about 2N transfers per hop. Packed, it costs two. The record's one key is its layout
    (`PACKED_PREFIX`, then names and shapes as JSON; the data keeps its dtype, which a
    server-side optimiser may widen), so the record stays
    self-describing through Flower's strategies: every reply of a round has the same key,
    and the element-wise aggregations (mean, median, trimmed mean, Krum's distances,
    FedAdam's moments) are the same on the concatenation as on the parts.
    """
    names = sorted(arrays)
    dtypes = {np.asarray(arrays[name]).dtype for name in names}
    if len(dtypes) != 1:
        return ArrayRecord({name: Array(np.ascontiguousarray(arrays[name])) for name in names})
    layout = {"tensors": [[name, list(np.shape(arrays[name]))] for name in names]}
    (dtype,) = dtypes
    parts = [np.ascontiguousarray(arrays[name], dtype=dtype.newbyteorder("=")).reshape(-1) for name in names]
    return ArrayRecord({PACKED_PREFIX + json.dumps(layout, separators=(",", ":")): _npy_array(parts)})


def _npy_array(parts: list[np.ndarray]) -> Array:
    """The `Array` that Flower's ``Array(np.concatenate(parts))`` makes, whose data is that
    array's .npy file, written with one copy of the values where Flower's way takes three
    (the concatenation, ``np.save`` into a buffer, and the buffer's bytes)."""
    dtype, count = parts[0].dtype, sum(part.size for part in parts)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)}
    )
    data = b"".join([header.getvalue(), *(memoryview(part).cast("B") for part in parts if part.size)])
    return Array(dtype=str(dtype), shape=(count,), stype=SType.NUMPY, data=data)


def _npy_view(array: Array) -> np.ndarray:
    """An `Array`'s values read in place from its .npy bytes: read-only, no copy.

    Raises
    ------
    ValueError
        If the data is not a .npy file of plain values, or is too short for its header.
    """
    if array.stype != SType.NUMPY:
        raise ValueError(f"array data of type {array.stype!r}, not {SType.NUMPY!r}")
    header = io.BytesIO(array.data)
    version = np.lib.format.read_magic(header)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        return array.numpy()  # a header only np.load reads
    shape, fortran_order, dtype = read_header[version](header)
    if dtype.hasobject:
        raise ValueError("array data holds Python objects")
    if fortran_order:
        return array.numpy()
    count = math.prod(shape)
    if len(array.data) - header.tell() < count * dtype.itemsize:
        raise ValueError(f"array data too short for {count} values of {dtype}")
    return np.frombuffer(array.data, dtype=dtype, count=count, offset=header.tell()).reshape(shape)


def record_to_arrays(record: ArrayRecord, *, copy: bool = True) -> dict[str, np.ndarray]:
    """Unwrap an `ArrayRecord` (packed or not) into named numpy arrays.

    ``copy=False`` gives read-only views of the record's bytes instead of arrays of their
    own: for readers (the aggregator checks and accumulates each update) that would
    otherwise hold every update twice.

    Raises
    ------
    ValueError
        If a packed record's layout is malformed or does not match its data.
    """
    if len(record) == 1 and (key := next(iter(record.keys()))).startswith(PACKED_PREFIX):
        flat = _npy_view(record[key])
        return _unpack(key[len(PACKED_PREFIX) :], flat.copy() if copy else flat)
    if copy:
        return {name: array.numpy() for name, array in record.items()}
    return {name: _npy_view(array) for name, array in record.items()}


def _unpack(layout_json: str, flat: np.ndarray) -> dict[str, np.ndarray]:
    try:
        layout = json.loads(layout_json)
        tensors = [(str(name), tuple(int(n) for n in shape)) for name, shape in layout["tensors"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"packed arrays: malformed layout ({exc})") from None
    sizes = [math.prod(shape) for _, shape in tensors]
    if flat.ndim != 1 or any(n < 0 for _, shape in tensors for n in shape):
        raise ValueError(f"packed arrays: data of shape {flat.shape} does not fit a layout")
    if sum(sizes) != flat.size or len({name for name, _ in tensors}) != len(tensors):
        raise ValueError(f"packed arrays: {flat.size} values for a layout of {sum(sizes)} in {len(tensors)} tensors")
    ends = np.cumsum(sizes)
    return {name: flat[end - size : end].reshape(shape) for (name, shape), size, end in zip(tensors, sizes, ends)}


def load_trainable(model: nn.Module, arrays: NamedArrays) -> None:
    """Copy ``arrays`` into the model's trainable parameters; names and shapes must match.

    Raises
    ------
    ValueError
        Naming the missing, unexpected or mis-shaped tensors.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(arrays))
    extra = sorted(set(arrays) - set(params))
    if missing or extra:
        raise ValueError(f"tensor names do not match the model: missing {missing}, unexpected {extra}")
    for name, param in params.items():
        value = arrays[name]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.array(value, copy=True)).to(param.dtype))


def _hash_field(h: hashlib._Hash, field: bytes) -> None:
    h.update(struct.pack("<Q", len(field)))
    h.update(field)


def hash_arrays(h: hashlib._Hash, arrays: NamedArrays) -> None:
    h.update(struct.pack("<Q", len(arrays)))
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        canonical = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        _hash_field(h, name.encode())
        _hash_field(h, canonical.dtype.str.encode())
        h.update(struct.pack("<Q", canonical.ndim))
        h.update(struct.pack(f"<{canonical.ndim}Q", *canonical.shape))
        _hash_field(h, canonical.tobytes(order="C"))


def digest(arrays: NamedArrays) -> str:
    """SHA-256 hex digest of named arrays over their canonical encoding."""
    h = hashlib.sha256()
    hash_arrays(h, arrays)
    return h.hexdigest()


def model_digest(arrays: NamedArrays, metadata: Mapping[str, str]) -> str:
    """SHA-256 hex digest of a model: its tensors and its header metadata.

    The encoding is the bytes ``fedgen model v1\\0``, then the tensors' canonical encoding
    (as `digest`), then the number of metadata entries and, in sorted key order, each key
    and value as UTF-8, every count and length a little-endian unsigned 64-bit integer.

    Raises
    ------
    ValueError
        If ``metadata`` holds the ``"digest"`` entry (a digest cannot cover itself) or a
        key or value that is not a string.
    """
    if DIGEST_METADATA_KEY in metadata:
        raise ValueError(f"model metadata must not hold its own {DIGEST_METADATA_KEY!r} entry")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("model metadata keys and values must be strings (safetensors header entries)")
    h = hashlib.sha256(_MODEL_DOMAIN)
    hash_arrays(h, arrays)
    h.update(struct.pack("<Q", len(metadata)))
    for key in sorted(metadata):
        _hash_field(h, key.encode("utf-8"))
        _hash_field(h, metadata[key].encode("utf-8"))
    return h.hexdigest()


def read_model_file(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and the header metadata of a safetensors model file, unchecked.

    Raises
    ------
    ValueError
        If the file cannot be read or is not a safetensors file, naming it.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{path} cannot be read as a safetensors model file ({exc})") from None
    return arrays, metadata


def model_file_digest(path: str | os.PathLike[str]) -> str:
    """`model_digest` of a safetensors model file: its tensors and every header entry but ``"digest"``.

    Raises
    ------
    ValueError
        If the file cannot be read or is not a safetensors file.
    """
    arrays, metadata = read_model_file(path)
    metadata.pop(DIGEST_METADATA_KEY, None)
    return model_digest(arrays, metadata)
