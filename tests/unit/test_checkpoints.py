import numpy as np
import pytest

from fedgen.params import digest
from fedgen.server.checkpoints import load_checkpoint, save_checkpoint


def test_checkpoint_named_by_round_and_digest_and_loads_back(tmp_path):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    path, model_digest = save_checkpoint(tmp_path / "ckpt", 3, arrays, '{"d_model": 8}')
    assert model_digest == digest(arrays)
    assert path.name == f"round-0003-{model_digest[:16]}.safetensors"
    assert not list(path.parent.glob("*.tmp"))
    loaded, metadata = load_checkpoint(path)
    np.testing.assert_array_equal(loaded["w"], arrays["w"])
    assert metadata == {"round": "3", "digest": model_digest, "model_config": '{"d_model": 8}'}


def test_tampered_checkpoint_is_detected(tmp_path):
    arrays = {"w": np.zeros(64, dtype=np.float32)}
    path, _ = save_checkpoint(tmp_path, 1, arrays, "{}")
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF  # last byte belongs to the tensor data
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="do not match the digest"):
        load_checkpoint(path)
