"""Atomic file writes: a reader, or a kill at any moment, sees the old file or the new one.

Write to a temporary file in the same directory, flush and fsync it, then ``os.replace``
(atomic on POSIX and Windows), then fsync the directory so the rename itself is durable.
Serialising to memory first means a full disk surfaces as ``OSError(ENOSPC)`` before the
target is touched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path

from vaelab.errors import UserError

TMP_SUFFIX = ".vaelab-tmp"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; a failure (a full disk, say) leaves ``path`` as it was
    and raises :class:`UserError` naming the file and the cause."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from the user's group
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        hint = "free some space" if err.errno == errno.ENOSPC else "check the folder exists and is writable"
        raise UserError(
            f"could not write {path}: {err.strerror or err}; {hint}. The previous {path.name}, if any, is unchanged"
        ) from None
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; it is set back at once
    os.umask(mask)
    return mask


def _remove(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the temporary files a killed write left behind (they never replaced anything)."""
    for leftover in Path(directory).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def loads_finite(text: str):
    """``json.loads`` that refuses NaN and Infinity: Python's json writes them, they are not JSON, and no
    record vaelab keeps holds one (a torn or edited record does)."""

    def refuse(name: str):
        raise ValueError(f"{name} is not a number of a record")

    return json.loads(text, parse_constant=refuse)
