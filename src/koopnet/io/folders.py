"""Output folders: checked before any work, and replaced whole by a staged run.

:func:`staged_folder` writes a run into a hidden sibling ``.NAME.XXXXXXXX.staging`` and swaps it
in with Linux ``renameat2(RENAME_EXCHANGE)`` (two renames where that is unavailable), so a
reader, or a run killed at any moment, sees the whole old run or the whole new one. Each staging
folder holds an advisory lock while its run lives; the kernel drops it when the run is killed,
which is how the next successful run tells a killed run's leftovers from a live one's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so stale staging folders are left alone
    fcntl = None

__all__ = ["check_output_dir", "prepare_output_dir", "staged_folder"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable; Windows cannot open folders, so it is skipped there."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output_dir(path: str | os.PathLike, *, force: bool = False) -> Path:
    """The checks of :func:`prepare_output_dir` without creating anything: run them before any
    work, so a bad ``--out`` fails in a second, not after the computation."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError("the output folder is empty (--out ''); pass a folder path.")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"output folder '{folder}' is a file; pick another path.")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise FileExistsError(
            f"output folder '{folder}' already exists and is not empty; "
            "pass --force to write into it"
        )
    existing = folder
    while not existing.exists():  # the nearest existing ancestor must be a writable folder
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"output folder '{folder}' lies below the file '{existing}'; "
                                 "pick another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder '{folder}' cannot be written ('{existing}' is not "
                              "writable); pick another path or fix its permissions.")
    return folder


def prepare_output_dir(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Create the output folder, refusing to mix new results into an old run unless ``force``.

    With ``force`` existing files are kept; those the new run writes are replaced atomically.
    """
    folder = check_output_dir(path, force=force)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _lock(path: Path) -> int | None:
    """An open descriptor of folder ``path`` holding its exclusive advisory lock, or None when
    another process holds it (or locks are unavailable). The kernel drops the lock when the
    holder dies, so an unlocked staging folder is one whose writer was killed."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _leftovers(folder: Path) -> list[Path]:
    """Staging (and fallback ``.old``) siblings of ``folder`` that killed runs left behind."""
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.[a-z0-9_]{{8}}\.(staging|old)")
    with contextlib.suppress(OSError):
        return [p for p in folder.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()
                and not p.is_symlink()]
    return []


def _remove_leftovers(folder: Path) -> None:
    for path in _leftovers(folder):
        fd = _lock(path)
        if fd is None:  # a live run is writing there
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _make_stage(folder: Path) -> tuple[Path, int | None]:
    """A fresh, locked, empty sibling of ``folder`` with the mode a new folder would get."""
    while True:
        stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".staging",
                                      dir=folder.parent))
        fd = _lock(stage)  # None where locks are unavailable: then no run removes it either
        if fd is not None and os.fstat(fd).st_nlink == 0:
            os.close(fd)  # another run's clean-up took it in the instant before we locked it
            continue
        os.chmod(stage, 0o777 & ~_umask())
        return stage, fd


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Write a whole run folder elsewhere, then put it in place in one step.

    Yields an empty temporary sibling ``.NAME.XXXXXXXX.staging`` of ``path``; when the block
    ends without an error, the sibling replaces ``path`` (an earlier run there, allowed only
    with ``force``, is swapped out atomically by Linux ``renameat2(RENAME_EXCHANGE)`` and
    removed). An error, Ctrl-C or a kill leaves ``path`` exactly as it was: readers see the
    whole old run or the whole new one, never a mix, and a failed run leaves no folder behind.
    A kill leaves its staging sibling behind; it holds no lock any more, so the next successful
    run into ``path`` removes it. Where the exchange is unavailable the old run is renamed aside
    first: a kill between those two renames leaves ``path`` missing for a moment, with both runs
    intact in siblings, until the next run.
    """
    folder = check_output_dir(path, force=force)
    if folder.is_dir() and any(folder.iterdir()) and not any(
            p.suffix in (".json", ".safetensors") for p in folder.iterdir()):
        raise FileExistsError(f"output folder '{folder}' holds no koopnet run (no .json "
                              "results or artifacts); --force replaces a whole earlier run, "
                              "so pick an empty or new folder.")
    folder = folder.resolve()  # a symlinked --out: replace the folder it points to, not the link
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage, lock = _make_stage(folder)
    try:
        yield stage
        if folder.is_dir() and _exchange(stage, folder):
            shutil.rmtree(stage)  # now holds the earlier run
        elif folder.is_dir():  # no atomic exchange here: move the old run aside first
            old = stage.with_suffix(".old")
            os.replace(folder, old)
            os.replace(stage, folder)
            shutil.rmtree(old)
        else:
            os.replace(stage, folder)
        _fsync_dir(folder.parent)
    finally:
        if lock is not None:
            os.close(lock)
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    _remove_leftovers(folder)
