"""Atomic file writes: write to a temp file in the target's folder, then rename over the target."""

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on any error removed.

    A reader therefore sees either the previous file or the complete new one, never a half-written file
    (the rename is atomic within one file system).

    Args:
        path: the final file; its folder is created if needed.
        suffix: ending of the temp file, which writers such as nibabel read the format from; default: the
            ending of `path` (".nii.gz" counts as one ending).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".tmp_{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
