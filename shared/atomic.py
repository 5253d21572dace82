"""Atomic file writes: write to a temp file in the target's folder, then rename over the target.

A reader sees the previous file or the complete new one, never a half-written one, and so does the next reader
after a power cut: the data is fsynced before the rename and the folder after it. The file gets the permissions a
plain `open(path, "w")` would give (0644 under umask 022, or the mode of the file it replaces), not mkstemp's 0600.

Temp files are named `.tmp_<target name>.<8 random characters><ending>`. A process killed while writing leaves its
temp file behind; `remove_stale_temps` removes those of a folder, and every training run calls it through
`shared.checkpoint.prepare_run_dir` when it starts or resumes. `undone_on_input_error` extends "nothing
half-written" from one file to a folder of outputs.
"""

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path

from shared.errors import InputError

TEMP_PREFIX = ".tmp_"
# `.tmp_<name>.<random><ending>`: tempfile's random part is 8 characters of [a-z0-9_]
_TEMP_NAME = re.compile(r"^\.tmp_(?P<name>.+)\.[a-z0-9_]{8}(?P<ending>.*)$")


def current_umask() -> int:
    """The process's file-creation mask (e.g. 0o022), read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no other way to read it: set and restore at once
    os.umask(mask)
    return mask


def _fsync_path(path, directory: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # folders cannot be opened on some platforms (Windows); their entries are flushed anyway
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _final_mode(path: Path) -> int:
    """Permission bits a plain `open(path, "w")` leaves: those of the file it replaces, else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path beside `path`; on success it is made durable and renamed to `path`, on any error removed.

    On success: the temp file is fsynced, given the permissions of a plain `open` (see `_final_mode`), renamed over
    `path` (atomic within one file system), and the folder is fsynced so that the rename survives a power cut.

    Args:
        path: the final file; its folder is created if needed.
        suffix: ending of the temp file, which writers such as nibabel read the format from; default: the
            ending of `path` (".nii.gz" counts as one ending).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_path(tmp)
        os.chmod(tmp, _final_mode(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_path(path.parent, directory=True)


def is_temp_name(name: str) -> bool:
    """True for a file name that `atomic_path` creates (`.tmp_checkpoint.pt.k3j9x0_a.pt`)."""
    return _TEMP_NAME.match(name) is not None


def remove_stale_temps(folder, recursive: bool = True) -> list[Path]:
    """Remove the temp files that writers killed mid-write left in `folder` (and its sub-folders).

    Call it only where no other process is writing: when a run starts or resumes its own run folder (rank 0,
    before it writes anything). Only names of `atomic_path`'s pattern are touched; a missing folder is a no-op.

    Args:
        folder: the run folder.
        recursive: also search its sub-folders (e.g. OUT/repeat_0/, OUT/cache/).
    Returns:
        the removed files, sorted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for root, dirs, files in os.walk(folder):  # does not follow links to folders
        for name in files:
            entry = Path(root, name)
            if is_temp_name(name) and not entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed.append(entry)
        if not recursive:
            dirs.clear()
    return sorted(removed)


@contextlib.contextmanager
def undone_on_input_error(folder):
    """A block that writes files into `folder`; if it stops on an InputError, what it added to `folder` is removed.

    A batch command (predict over a dataset) reads each case only when it reaches it, so a broken last case would
    leave the first cases' outputs behind, looking like a finished run. Files that were in `folder` before stay
    (one the block overwrote keeps its new content), and so does `folder` if it existed; an interruption (Ctrl-C)
    or a crash keeps the finished outputs, to look at or to continue from.
    """
    folder = Path(folder)
    existed = folder.exists()
    before = set(folder.rglob("*")) if existed else set()
    try:
        yield folder
    except InputError:
        if folder.is_dir():
            for path in sorted(set(folder.rglob("*")) - before, reverse=True):  # a folder after what it holds
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()
            if not existed:
                folder.rmdir()
        raise
