"""The one atomic file writer.

Temp file in the same directory, mode set before the rename, fsync of the file, rename over the
target, fsync of the directory. The content is compared first and an unchanged file is not touched
(its mtime stays), so a second ``apply`` with the same input writes nothing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def read_bytes_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644, *, make_parents: bool = True) -> bool:
    """Write ``data`` to ``path`` atomically; True if the file changed, False if it already held it."""
    if isinstance(data, str):
        data = data.encode()
    current = read_bytes_or_none(path)
    if current == data:
        if (path.stat().st_mode & 0o7777) != mode:
            os.chmod(path, mode)
            return True
        return False
    directory = path.parent
    if make_parents:
        directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return True


def remove_durably(path: Path) -> bool:
    """Remove ``path`` and fsync its directory. Returns True if something was removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True
