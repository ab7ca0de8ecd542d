"""Replace a file whole or not at all, durably: the one way fedgen writes a file in place.

The new content goes to a temporary file in the same folder (created with its final mode,
so a key is 0600 from its first byte), which is fsynced, renamed over the target and the
rename made durable by fsyncing the folder. A crash leaves either the old file or the new
one; a failure leaves the old one and no temporary file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_MODE = 0o666  # as open() creates files, less the umask


@contextmanager
def replacing(path: str | Path, mode: int = DEFAULT_MODE) -> Iterator[Path]:
    """Yield a fresh temporary path to write; on a clean exit it becomes ``path``.

    For writers that take a file name (safetensors); `write_bytes` and `write_text` cover
    the rest. The temporary file exists, empty, with ``mode`` when the block starts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_bytes(path: str | Path, data: bytes, mode: int = DEFAULT_MODE) -> Path:
    """Replace ``path`` with ``data`` (see the module docstring); return ``path``."""
    with replacing(path, mode) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, mode: int = DEFAULT_MODE) -> Path:
    """Replace ``path`` with ``text`` in UTF-8 (see the module docstring); return ``path``."""
    return write_bytes(path, text.encode("utf-8"), mode)


def fsync_directory(directory: str | Path) -> None:
    """Make the renames and creations in ``directory`` durable (a no-op off POSIX)."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
