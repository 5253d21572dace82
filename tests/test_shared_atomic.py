"""shared.atomic: umask-honouring modes, fsync before/after the rename, failure path, stale temps; pytest -q
tests/test_shared_atomic.py"""

import os
import stat

import pytest

from shared import atomic
from shared.atomic import atomic_path, current_umask, is_temp_name, remove_stale_temps


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_file_gets_the_mode_of_a_plain_open(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    with atomic_path(tmp_path / "out.csv") as tmp:
        tmp.write_text("a,b\n")
    with open(tmp_path / "plain.csv", "w") as f:
        f.write("a,b\n")
    assert mode(tmp_path / "out.csv") == mode(tmp_path / "plain.csv") == expected


def test_replaced_file_keeps_its_mode_as_a_plain_open_does(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "shared.nii.gz"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    with atomic_path(target) as tmp:
        assert tmp.name.startswith(".tmp_shared.nii.gz.") and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and mode(target) == 0o640


def test_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    target = tmp_path / "checkpoint.pt"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"data")
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1] == str(tmp)  # the temp file's data, before it becomes visible
    assert events[1][1] == str(target)
    assert events[2][1] == str(tmp_path)  # the folder, so the rename itself survives a power cut


def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="writer crashed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["metrics.csv"]


def test_failed_fsync_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")

    def failing_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        with atomic_path(target) as tmp:
            tmp.write_text("new\n")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["metrics.csv"]


def test_remove_stale_temps_removes_only_atomic_path_temps(tmp_path):
    (tmp_path / "repeat_0").mkdir()
    stale = [tmp_path / ".tmp_checkpoint.pt.k3j9x0_a.pt", tmp_path / "repeat_0" / ".tmp_log.csv.abcdefgh.csv"]
    kept = [
        tmp_path / "checkpoint.pt",
        tmp_path / ".tmp_notes",  # no random part: not ours
        tmp_path / ".tmp_x.ABCDEFGH.pt",  # upper case is not in tempfile's alphabet
        tmp_path / "tmp_checkpoint.pt.k3j9x0_a.pt",
    ]
    for path in stale + kept:
        path.write_bytes(b"x")
    removed = remove_stale_temps(tmp_path)
    assert removed == sorted(stale)
    assert all(not p.exists() for p in stale) and all(p.exists() for p in kept)
    assert remove_stale_temps(tmp_path / "missing") == []


def test_remove_stale_temps_can_stay_in_the_top_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    top, below = tmp_path / ".tmp_a.pt.abcdefgh.pt", tmp_path / "sub" / ".tmp_b.pt.abcdefgh.pt"
    top.write_bytes(b"x")
    below.write_bytes(b"x")
    assert remove_stale_temps(tmp_path, recursive=False) == [top]
    assert below.exists()


def test_temp_names_of_atomic_path_match_the_stale_pattern(tmp_path):
    with atomic_path(tmp_path / "image.nii.gz") as tmp:
        assert is_temp_name(tmp.name)
        tmp.write_bytes(b"x")
    assert not is_temp_name("image.nii.gz")


def test_undone_on_input_error_removes_only_what_the_block_added(tmp_path):
    from shared.atomic import undone_on_input_error
    from shared.errors import InputError

    out = tmp_path / "preds"
    out.mkdir()
    (out / "old.nii.gz").write_text("before")
    with pytest.raises(InputError):
        with undone_on_input_error(out):
            (out / "a.nii.gz").write_text("new")
            (out / "sub").mkdir()
            (out / "sub" / "b.nii.gz").write_text("new")
            (out / "old.nii.gz").write_text("overwritten")
            raise InputError("case 3 is broken")
    assert sorted(p.name for p in out.rglob("*")) == ["old.nii.gz"]
    assert (out / "old.nii.gz").read_text() == "overwritten"  # what was there stays, with its new content

    fresh = tmp_path / "fresh"
    with pytest.raises(InputError):
        with undone_on_input_error(fresh):
            fresh.mkdir()
            (fresh / "a.nii.gz").write_text("new")
            raise InputError("broken")
    assert not fresh.exists()  # a folder the block created goes too

    with pytest.raises(KeyboardInterrupt):
        with undone_on_input_error(fresh):
            fresh.mkdir()
            (fresh / "a.nii.gz").write_text("done")
            raise KeyboardInterrupt
    assert (fresh / "a.nii.gz").read_text() == "done"  # an interruption keeps the finished outputs
