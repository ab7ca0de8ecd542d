import os
import stat

import pytest

from fedgen import atomic


def _fsynced_folders(monkeypatch) -> list[tuple[int, int]]:
    """Record the (device, inode) of every folder fsynced from now on (the fsync still runs)."""
    synced, real_fsync = [], os.fsync

    def recording_fsync(descriptor: int) -> None:
        info = os.fstat(descriptor)
        if stat.S_ISDIR(info.st_mode):
            synced.append((info.st_dev, info.st_ino))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


def _identity(path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def test_write_replaces_the_file_and_makes_the_rename_durable(tmp_path, monkeypatch):
    target = tmp_path / "nested" / "state.json"
    atomic.write_text(target, "old")
    synced = _fsynced_folders(monkeypatch)
    atomic.write_text(target, "new ε")
    assert target.read_text(encoding="utf-8") == "new ε"
    assert _identity(target.parent) in synced
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.replacing(target) as temporary:
            temporary.write_bytes(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_the_file_has_its_mode_from_the_first_byte(tmp_path):
    key = tmp_path / "site.key"
    with atomic.replacing(key, 0o600) as temporary:
        assert stat.S_IMODE(temporary.stat().st_mode) == 0o600  # before any secret is written
        temporary.write_bytes(b"secret")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes() == b"secret"
