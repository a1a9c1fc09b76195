"""What a run directory is, what in it is vaelab's, and who may write it.

A run directory is one that holds ``.vaelab-run``, a marker vaelab writes when it creates the run
(the run's id, vaelab's version, the time). A stray ``config.toml`` does not make one. The promises
about the user's files rest on three rules kept here:

- **vaelab deletes only what it wrote.** ``--overwrite`` (and ``--auto-resume`` restarting a run that
  never reached its first checkpoint) removes vaelab's own names from a marked directory (:func:`remove_owned`) and
  leaves everything else in it where it was.
- **One writer at a time.** :func:`lock` holds an exclusive ``flock`` on ``.vaelab-lock`` while a
  command writes a run; a second writer is refused with the holder's process id and host. The kernel
  releases the lock when its process dies, however it dies, so a stale lock never blocks.
- **No link is followed.** A run's own paths that are symbolic links are refused before anything is
  written (:func:`refuse_links`); files are written by temp file + rename, which replaces a path and
  never writes through it; and an output option may not name a file of a run (:func:`check_output`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

from vaelab.errors import UserError
from vaelab.fileio import TMP_SUFFIX, atomic_write_text

MARKER = ".vaelab-run"
LOCK = ".vaelab-lock"
# The files and folders vaelab writes in a run directory (besides the marker and the lock). The
# folders are vaelab's too: checkpoints/ holds last.pt, best.pt and their temporaries, tensorboard/
# the event files, report/ the figures of ``vaelab report``.
OWNED_FILES = ("config.toml", "metrics.csv", "model.safetensors", "evaluation.json", "compression.json", "report.html")
OWNED_DIRS = ("checkpoints", "tensorboard", "report")
# the names vaelab gives inside its folders: what --overwrite may delete there
OWNED_IN_DIRS = {
    "checkpoints": ("last.pt", "best.pt", f".*{TMP_SUFFIX}"),
    "tensorboard": ("events.out.tfevents.*",),
    "report": ("[0-9][0-9]-*.png", ".vaelab-report"),
}


def is_run(path: Path) -> bool:
    """Whether ``path`` holds a marker written for it: one copied in from another folder records that
    folder's inode, and makes no run of the user's folder (whose files --overwrite would delete)."""
    marker = Path(path) / MARKER
    if not marker.is_file() or marker.is_symlink():
        return False
    try:
        recorded = json.loads(marker.read_text()).get("folder_inode")
        return recorded is None or recorded == os.stat(path).st_ino  # None: a marker from before it was recorded
    except (OSError, ValueError, AttributeError):
        return False


def _looks_like_run(path: Path) -> bool:
    """A marked run, or one written before the marker existed (config.toml beside checkpoints/):
    for refusing to write over a run's files, where a false alarm costs only a message."""
    return (path / MARKER).exists() or ((path / "config.toml").is_file() and (path / "checkpoints").is_dir())


def mark(out: Path, new: bool = False) -> None:
    """Write the marker of a run: with ``new`` a new identity (a new run, or one replacing the run
    that was there); else only where there is none (a run written before the marker existed)."""
    if is_run(out) and not new:
        return
    copied = None if new else run_id(out)  # a run copied here whole and resumed keeps its identity
    identity = {
        "run_id": copied or uuid.uuid4().hex,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "vaelab": _version(),
        "folder_inode": os.stat(out).st_ino,  # whose marker this is (see is_run)
    }
    atomic_write_text(out / MARKER, json.dumps(identity, indent=1) + "\n")


def run_id(out: Path) -> str | None:
    try:
        return json.loads((Path(out) / MARKER).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vaelab")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without installing
        return "unknown"


def refuse_links(out: Path) -> None:
    """Refuse a run whose own paths (its files, folders, marker and lock) include a symbolic link:
    writing through it could change a file anywhere the user can write."""
    for name in (*OWNED_FILES, *OWNED_DIRS, MARKER, LOCK):
        if (out / name).is_symlink():
            raise UserError(
                f"{out / name} is a symbolic link; vaelab never writes through links in a run directory. "
                "Replace it with the file itself, or copy the run"
            )
    for folder in OWNED_DIRS:
        if (out / folder).is_dir():
            for entry in (out / folder).iterdir():
                if entry.is_symlink():
                    raise UserError(
                        f"{entry} is a symbolic link; vaelab never writes through links in a run directory. "
                        "Remove it, or copy the run"
                    )


def remove_owned(out: Path) -> None:
    """Delete what vaelab writes in the marked run ``out``: its files (:data:`OWNED_FILES`), and in its
    folders (:data:`OWNED_DIRS`) only the names vaelab gives there (:data:`OWNED_IN_DIRS`); a folder
    left empty goes too. Anything else (a checkpoint the user copied into checkpoints/, say) stays."""
    if not is_run(out):
        raise UserError(
            f"{out} is not a vaelab run directory (it has no {MARKER} marker of its own); refusing to delete anything "
            "in it. Choose another --out, or remove the folder yourself"
        )
    refuse_links(out)
    for name in OWNED_FILES:
        (out / name).unlink(missing_ok=True)
    for leftover in out.glob(f".*{TMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
    for folder, patterns in OWNED_IN_DIRS.items():
        if not (out / folder).is_dir():
            continue
        for pattern in patterns:
            for path in (out / folder).glob(pattern):
                if path.is_file():
                    path.unlink()
        with contextlib.suppress(OSError):  # not empty: the user's files are in it
            (out / folder).rmdir()


@contextlib.contextmanager
def lock(out: Path, what: str = "writing") -> Iterator[None]:
    """Hold the run's write lock for the ``with`` block; refuse, naming the holder, if another
    process holds it. ``flock`` is released by the kernel when the holder exits or is killed."""
    path = Path(out) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(
                f"{path} is a symbolic link; vaelab never writes through links in a run directory"
            ) from None
        raise UserError(f"cannot lock {out} ({err.strerror}); check the folder is writable") from None
    try:
        if os.fstat(fd).st_nlink > 1 or not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(
                f"{path} is a hard link to another file (or not a file); vaelab writes the holder of a run's lock "
                "into it. Remove it, or copy the run"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise UserError(
                f"{out} is being written by {holder}; wait for it to end, or stop it (a lock of a process that "
                "has ended is released by itself)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} ({what})".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the holder goes with the lock: a run that travels names no process or host
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the folder itself for the ``with`` block (a sweep's folder of runs,
    which holds no file of vaelab's own); refuse if another process holds it."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise UserError(f"cannot lock {folder} ({err.strerror}); give a folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{folder} is in use by another {what}; wait for it to end, or stop it") from None
        yield
    finally:
        os.close(fd)


def check_output(
    path: Path, option: str, also: tuple[Path, ...] = (), may_be: str | None = None, outputs: tuple = ()
) -> None:
    """Refuse an output path that is a file of a run (its config, weights, metrics, records, marker,
    lock, anything under checkpoints/ or tensorboard/) other than ``may_be``, the run file the
    option writes anyway (``evaluate --json`` the record, ``report --out`` the page), one of
    ``also`` (the input the command reads): writing there would leave a run that no longer loads;
    or one of ``outputs`` (the command's other outputs, given before it): one would replace the other."""
    target = Path(path).resolve()
    for given in also:
        if Path(given).exists() and target == Path(given).resolve():
            raise UserError(f"{option} {path} is the file this command reads; write the output elsewhere")
    for other in outputs:
        if other is not None and target == Path(other).resolve():
            raise UserError(f"{option} {path} is also another output of this command; give each output its own file")
    parent = target.parent
    owned = {*OWNED_FILES, *OWNED_DIRS, MARKER, LOCK} - {may_be}
    if _looks_like_run(parent) and target.name in owned:
        raise UserError(f"{option} {path} would overwrite a file of the run in {parent}; write the output elsewhere")
    if parent.name in ("checkpoints", "tensorboard") and _looks_like_run(parent.parent):
        raise UserError(
            f"{option} {path} is inside the run {parent.parent}'s {parent.name}/; write the output elsewhere"
        )
