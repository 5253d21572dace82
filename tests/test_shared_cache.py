"""Checks the preprocessed cache (keys, reuse, rebuild of stale/truncated cases, kill-resume, concurrency):
pytest -q tests/test_shared_cache.py"""

import json
import multiprocessing
import os

import nibabel as nib
import numpy as np
import pytest

from shared.cache import Preprocessing, build_cache, cache_folder, foreground_locations, preprocess_case
from shared.dataset import list_cases, write_dataset_json
from shared.errors import InputError

SHAPE = (6, 7, 8)
AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])


def save(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))


def make_dataset(root, cases=4, missing=()):
    """Channels T1, FLAIR; case i has a lesion (label 1) and, for odd i, label 2; cases in `missing` lack FLAIR."""
    write_dataset_json(root, ["T1", "FLAIR"], {"background": 0, "a": 1, "b": 2}, num_training=cases)
    for i in range(cases):
        rng = np.random.default_rng(i)
        save(root / "imagesTr" / f"c{i}_0000.nii.gz", rng.normal(5, 2, SHAPE).astype(np.float32))
        if f"c{i}" not in missing:
            save(root / "imagesTr" / f"c{i}_0001.nii.gz", rng.normal(-3, 1, SHAPE).astype(np.float32))
        label = np.zeros(SHAPE, np.uint8)
        label[1:3, 2:4, 3 : 3 + i + 1] = 1
        if i % 2:
            label[4, 5, 6] = 2
        save(root / "labelsTr" / f"c{i}.nii.gz", label)
    return root


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "Dataset001_Tiny")


def snapshot(folder):
    """{file name: bytes} of every cached file (lock and params excluded)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def test_entries_hold_the_preprocessed_arrays(dataset, tmp_path):
    prep = Preprocessing(normalise="zscore")
    entries = build_cache(dataset, prep, cache_root=tmp_path / "cache", progress=False)
    assert [e.case_id for e in entries] == ["c0", "c1", "c2", "c3"]
    case = list_cases(dataset)[2]
    image, label, props = preprocess_case(case, prep)
    np.testing.assert_array_equal(entries[2].open_image(), image)
    np.testing.assert_array_equal(entries[2].open_label(), label)
    raw = nib.load(case.images["T1"]).get_fdata()
    np.testing.assert_allclose(image[0], (raw - raw.mean()) / raw.std(), atol=1e-5)  # whole-volume z-score
    assert entries[2].classes[1]["voxels"] == 2 * 2 * 3 and 2 not in entries[2].classes
    assert entries[3].classes[2] == {"start": 16, "stop": 17, "voxels": 1, "bbox": [[4, 5, 6], [4, 5, 6]]}
    np.testing.assert_array_equal(entries[3].class_locations(2), [[4, 5, 6]])
    assert entries[0].channels == ("T1", "FLAIR") and entries[0].spacing == (2.0, 1.0, 1.0)


def test_foreground_locations_keep_at_most_10000_and_at_least_one_percent():
    label = np.zeros((100, 100, 250), np.uint8)
    label[:, :, :200] = 1  # 2,000,000 voxels -> 1 % = 20,000 kept
    label[:, :, 200:210] = 2  # 100,000 voxels -> 10,000 kept
    label[0, 0, 249] = 3  # 1 voxel -> kept
    coords, classes = foreground_locations(label)
    counts = {c: info["stop"] - info["start"] for c, info in classes.items()}
    assert counts == {1: 20_000, 2: 10_000, 3: 1}
    for value, info in classes.items():
        picked = coords[info["start"] : info["stop"]]
        assert (label[tuple(picked.T)] == value).all()  # every stored voxel belongs to its class
        assert len(np.unique(picked, axis=0)) == len(picked)  # drawn without replacement
    assert classes[2]["bbox"] == [[0, 0, 200], [99, 99, 209]]
    coords_again, _ = foreground_locations(label)
    np.testing.assert_array_equal(coords, coords_again)  # fixed seed: a rebuild gives the same file


def test_key_follows_every_parameter_and_the_modality_order(dataset, tmp_path):
    base = cache_folder(dataset, Preprocessing(modalities=("T1", "FLAIR")), tmp_path)
    assert base == cache_folder(dataset, Preprocessing(modalities=("t1w", "t2-flair")), tmp_path)  # aliases
    both = ("T1", "FLAIR")
    others = [
        Preprocessing(modalities=("FLAIR", "T1")),
        Preprocessing(modalities=both, spacing=(1, 1, 1)),
        Preprocessing(modalities=both, labels="binary"),
        Preprocessing(modalities=both, normalise="zscore"),
    ]
    for other in others:
        assert cache_folder(dataset, other, tmp_path) != base
    flipped = build_cache(dataset, Preprocessing(modalities=("FLAIR", "T1")), cache_root=tmp_path, progress=False)
    straight = build_cache(dataset, Preprocessing(modalities=("T1", "FLAIR")), cache_root=tmp_path, progress=False)
    np.testing.assert_array_equal(flipped[0].open_image()[::-1], straight[0].open_image())


def test_second_build_reuses_and_a_changed_source_rebuilds_only_that_case(dataset, tmp_path):
    prep = Preprocessing()
    entries = build_cache(dataset, prep, cache_root=tmp_path, progress=False)
    stamps = {e.case_id: os.stat(e.image).st_mtime_ns for e in entries}
    again = build_cache(dataset, prep, cache_root=tmp_path, progress=False)
    assert {e.case_id: os.stat(e.image).st_mtime_ns for e in again} == stamps
    new = np.full(SHAPE, 7.0, np.float32)
    save(dataset / "imagesTr" / "c1_0000.nii.gz", new)  # corrected data
    rebuilt = build_cache(dataset, prep, cache_root=tmp_path, progress=False)
    np.testing.assert_array_equal(rebuilt[1].open_image()[0], new)
    assert os.stat(rebuilt[0].image).st_mtime_ns == stamps["c0"]


@pytest.mark.parametrize("damage", ["truncate", "reshape", "delete_props"])
def test_a_damaged_cached_case_is_rebuilt_not_read(dataset, tmp_path, damage):
    prep = Preprocessing(normalise="zscore")
    entry = build_cache(dataset, prep, cache_root=tmp_path, progress=False)[1]
    good = np.load(entry.image)
    if damage == "truncate":
        with open(entry.image, "r+b") as f:
            f.truncate(os.path.getsize(entry.image) - 8)
    elif damage == "reshape":  # same byte size, other shape in the header
        np.save(entry.image, good.reshape(2, 7, 6, 8))
    else:
        os.remove(entry.image[: -len(".npy")] + ".json")
    fixed = build_cache(dataset, prep, cache_root=tmp_path, progress=False)[1]
    np.testing.assert_array_equal(fixed.open_image(), good)


def test_missing_channel_is_zero_and_flagged_or_refused(tmp_path):
    root = make_dataset(tmp_path / "Dataset002_Gap", missing=("c2",))
    entries = build_cache(root, Preprocessing(missing="zero"), cache_root=tmp_path, progress=False)
    assert entries[2].available == (1, 0) and entries[1].available == (1, 1)
    assert not entries[2].open_image()[1].any()
    with pytest.raises(InputError, match=r"c2 .*FLAIR"):
        build_cache(root, Preprocessing(missing="refuse"), cache_root=tmp_path / "b", progress=False)


def test_reorient_and_resample_record_the_way_back(dataset, tmp_path):
    prep = Preprocessing(reorient=True, spacing=(1.0, 1.0, 1.0), labels="binary")
    case = list_cases(dataset)[3]
    image, label, props = preprocess_case(case, prep)
    assert props["native_shape"] == [6, 7, 8] and props["native_spacing"] == [2.0, 1.0, 1.0]
    assert image.shape == (2, 12, 7, 8) and props["shape"] == [12, 7, 8] and props["spacing"] == [1.0, 1.0, 1.0]
    assert set(np.unique(label)) == {0, 1}  # binary: label 2 became lesion


def test_unknown_case_ids_and_bad_parameters_are_refused(dataset, tmp_path):
    with pytest.raises(InputError, match=r"\['zz'\]"):
        build_cache(dataset, Preprocessing(), case_ids=["c0", "zz"], cache_root=tmp_path, progress=False)
    with pytest.raises(InputError, match="normalise"):
        Preprocessing(normalise="minmax")
    with pytest.raises(InputError, match="spacing"):
        Preprocessing(spacing=(1.0, -1.0, 1.0))
    with pytest.raises(InputError, match="DWI"):
        build_cache(dataset, Preprocessing(modalities=("DWI",)), cache_root=tmp_path, progress=False)


def _interrupt_after(count):
    """A stand-in for `_build_one` that builds `count` cases, leaves a temp file and dies like a killed process."""
    import shared.cache as cache

    done = []

    def build(task):
        if len(done) == count:
            (task[2] / ".tmp_c9_seg.npy.k3j9x0a1.npy").write_bytes(b"\x93NUMPY partial")
            raise KeyboardInterrupt
        done.append(cache.write_case(*task))
        return task[0].case_id

    return build


def test_interrupted_build_finishes_into_the_same_cache(dataset, tmp_path, monkeypatch):
    import shared.cache as cache

    prep = Preprocessing(normalise="zscore")
    reference = build_cache(dataset, prep, cache_root=tmp_path / "ref", progress=False)
    monkeypatch.setattr(cache, "_build_one", _interrupt_after(2))
    with pytest.raises(KeyboardInterrupt):
        build_cache(dataset, prep, cache_root=tmp_path / "run", progress=False)
    monkeypatch.undo()
    folder = cache_folder(dataset, prep, tmp_path / "run") / "Tr"
    assert len(list(folder.glob("*.json"))) == 2 and list(folder.glob(".tmp_*"))
    resumed = build_cache(dataset, prep, cache_root=tmp_path / "run", progress=False)
    assert not list(folder.glob(".tmp_*"))  # the killed build's temp file is gone
    assert snapshot(folder) == snapshot(cache_folder(dataset, prep, tmp_path / "ref") / "Tr")
    assert [e.case_id for e in resumed] == [e.case_id for e in reference]


def _build_in_child(args):
    root, cache_root = args
    os.environ["OMP_NUM_THREADS"] = "1"
    return [e.case_id for e in build_cache(root, Preprocessing(normalise="zscore"), cache_root=cache_root,
                                           progress=False)]  # fmt: skip


def test_two_processes_building_at_once_give_one_valid_cache(tmp_path):
    root = make_dataset(tmp_path / "Dataset003_Race", cases=8)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_build_in_child, [(root, tmp_path / "c"), (root, tmp_path / "c")])
    assert results[0] == results[1] == [f"c{i}" for i in range(8)]
    build_cache(root, Preprocessing(normalise="zscore"), cache_root=tmp_path / "ref", progress=False)
    prep = Preprocessing(normalise="zscore")
    assert snapshot(cache_folder(root, prep, tmp_path / "c") / "Tr") == snapshot(
        cache_folder(root, prep, tmp_path / "ref") / "Tr"
    )


def test_parallel_build_equals_serial_build(tmp_path):
    root = make_dataset(tmp_path / "Dataset004_Par", cases=5)
    prep = Preprocessing(spacing=(1.0, 1.0, 1.0))
    build_cache(root, prep, cache_root=tmp_path / "a", processes=2, progress=False)
    build_cache(root, prep, cache_root=tmp_path / "b", processes=1, progress=False)
    a, b = (snapshot(cache_folder(root, prep, tmp_path / x) / "Tr") for x in "ab")
    assert a == b and len(a) == 5 * 4
    params = json.loads((cache_folder(root, prep, tmp_path / "a") / "params.json").read_text())
    assert params["preprocessing"]["spacing"] == [1.0, 1.0, 1.0]


def test_same_named_datasets_in_two_places_never_share_a_cache(tmp_path):
    first = make_dataset(tmp_path / "site_a" / "Dataset001_Tiny")
    second = make_dataset(tmp_path / "site_b" / "Dataset001_Tiny")  # same name, same dataset.json
    save(second / "imagesTr" / "c0_0000.nii.gz", np.full(SHAPE, 3.0, np.float32))
    assert cache_folder(first, Preprocessing(), tmp_path) != cache_folder(second, Preprocessing(), tmp_path)
    a = build_cache(first, Preprocessing(), cache_root=tmp_path / "c", progress=False)[0]
    b = build_cache(second, Preprocessing(), cache_root=tmp_path / "c", progress=False)[0]
    assert a.image != b.image and (b.open_image()[0] == 3.0).all()


def test_a_refused_dataset_leaves_no_cache_description(tmp_path):
    root = make_dataset(tmp_path / "Dataset005_Gap", missing=("c1",))
    with pytest.raises(InputError, match="c1"):
        build_cache(root, Preprocessing(missing="refuse"), cache_root=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()  # not even case c0, built before c1 was refused


@pytest.mark.parametrize("processes", [1, 2])
def test_a_refused_build_keeps_the_entries_of_earlier_builds_only(tmp_path, processes):
    root = make_dataset(tmp_path / "Dataset006_Gap", missing=("c3",))
    prep = Preprocessing(missing="refuse")
    build_cache(root, prep, case_ids=["c0"], cache_root=tmp_path / "c", progress=False)
    before = sorted(p.name for p in (cache_folder(root, prep, tmp_path / "c") / "Tr").iterdir())
    with pytest.raises(InputError, match="c3"):
        build_cache(root, prep, cache_root=tmp_path / "c", processes=processes, progress=False)
    assert sorted(p.name for p in (cache_folder(root, prep, tmp_path / "c") / "Tr").iterdir()) == before
