import numpy as np
import pytest
from safetensors.numpy import save_file

from fedgen.params import digest, model_digest, model_file_digest, read_model_file
from fedgen.server.checkpoints import checkpoint_digest, load_checkpoint, save_checkpoint


def test_checkpoint_named_by_round_and_model_digest_and_loads_back(tmp_path):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    path, digest_of_model = save_checkpoint(tmp_path / "ckpt", 3, arrays, '{"d_model": 8}')
    # The model digest covers the tensors and the header metadata fedgen reads back.
    assert digest_of_model == model_digest(arrays, {"round": "3", "model_config": '{"d_model": 8}'})
    assert digest_of_model == checkpoint_digest(3, arrays, '{"d_model": 8}') == model_file_digest(path)
    assert digest_of_model != digest(arrays)
    assert path.name == f"round-0003-{digest_of_model[:16]}.safetensors"
    assert not list(path.parent.glob("*.tmp"))
    loaded, metadata = load_checkpoint(path)
    np.testing.assert_array_equal(loaded["w"], arrays["w"])
    assert metadata == {"round": "3", "digest": digest_of_model, "model_config": '{"d_model": 8}'}


def test_model_digest_changes_with_any_tensor_or_metadata_change_only():
    arrays = {"w": np.zeros((2, 2), np.float32), "b": np.ones(2, np.float64)}
    metadata = {"round": "1", "model_config": "{}"}
    reference = model_digest(arrays, metadata)
    assert model_digest({"b": arrays["b"], "w": arrays["w"]}, dict(reversed(metadata.items()))) == reference
    variants = [
        ({**arrays, "w": np.zeros((4,), np.float32)}, metadata),  # shape
        ({**arrays, "w": np.zeros((2, 2), np.float64)}, metadata),  # dtype
        ({**arrays, "w": np.eye(2, dtype=np.float32)}, metadata),  # values
        (arrays, {**metadata, "model_config": '{"d": 1}'}),  # a header value
        (arrays, {**metadata, "trust_remote_code": "true"}),  # an added header entry
        (arrays, {"round": "1model_config{}"}),  # entries run together
    ]
    assert len({model_digest(a, m) for a, m in variants} | {reference}) == len(variants) + 1
    with pytest.raises(ValueError, match="own 'digest'"):
        model_digest(arrays, {**metadata, "digest": reference})


def test_tampered_checkpoint_is_detected(tmp_path):
    arrays = {"w": np.zeros(64, dtype=np.float32)}
    path, _ = save_checkpoint(tmp_path, 1, arrays, "{}")
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF  # last byte belongs to the tensor data
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="do not match the digest"):
        load_checkpoint(path)


def test_an_edited_header_or_a_foreign_file_is_refused(tmp_path):
    path, _ = save_checkpoint(tmp_path, 2, {"w": np.zeros(4, np.float32)}, '{"layers": 1}')
    arrays, metadata = read_model_file(path)
    save_file(arrays, str(path), metadata={**metadata, "model_config": '{"layers": 9}'})
    with pytest.raises(ValueError, match="do not match the digest"):
        load_checkpoint(path)
    save_file(arrays, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a fedgen checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(tmp_path / "junk.safetensors")
