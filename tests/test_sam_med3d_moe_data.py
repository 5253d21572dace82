"""SAM-Med3D's data path on the shared cache: targets from the cached class records, crops read from the memory
maps against a naive crop of the whole label, batches independent of the worker count, and the evaluation's
mapping of a crop back to the original grid (reoriented, permuted axes) checked by hand.

Run: pytest tests/test_sam_med3d_moe_data.py
"""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sam_med3d_moe.data import AUGMENTATION, DrawBatch, build_targets, load_cases, read_target
from sam_med3d_moe.evaluate import NativeGrid
from sam_med3d_moe.preprocess import crop_start
from shared.augment import BatchAugmentation
from shared.dataset import list_cases
from shared.errors import InputError
from shared.loader import training_batches
from shared.phantom import write_phantom_datasets


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 3-case anatomy phantom whose files are rewritten with a permuted and flipped affine (LPI-like), so the
    cache reorients and the native-grid mapping must undo it."""
    root = tmp_path_factory.mktemp("sam_data")
    (anatomy,) = write_phantom_datasets(root / "raw", datasets=["anatomy"], cases=3, shape=(20, 22, 18), seed=1)
    affine = np.array([[0, -1.0, 0, 10], [0, 0, 1.0, -5], [-1.0, 0, 0, 3], [0, 0, 0, 1]])
    for path in Path(anatomy).rglob("*.nii.gz"):
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), path)
    cache = root / "cache"
    ids = {Path(anatomy).name: [c.case_id for c in list_cases(anatomy)]}
    entries = load_cases([anatomy], ids, ["T1"], spacing=1.0, ct_clamp=False, cache_root=cache)
    return {"root": Path(anatomy), "entries": entries, "cache": cache}


def test_targets_come_from_the_cached_class_records(dataset):
    entries = dataset["entries"]
    targets = build_targets(entries)
    label = entries[0].open_label()
    values = sorted(int(v) for v in np.unique(label) if v > 0)
    own = [t for t in targets if t.case_id == entries[0].case_id]
    assert [t.label for t in own] == values and all(t.modality == "T1" for t in own)
    for t in own:
        idx = np.argwhere(label == t.label)
        assert t.voxels == len(idx) and t.bbox_min == tuple(idx.min(0)) and t.bbox_max == tuple(idx.max(0))
    union = [t for t in build_targets(entries, union=[]) if t.case_id == entries[0].case_id]
    idx = np.argwhere(label > 0)
    assert len(union) == 1 and union[0].label is None and union[0].voxels == len(idx)
    assert union[0].bbox_min == tuple(idx.min(0)) and union[0].bbox_max == tuple(idx.max(0))
    assert {t.label for t in build_targets(entries, labels=[2])} == {2}
    with pytest.raises(InputError, match="no labelled target with label value\\(s\\) \\[99\\]"):
        build_targets(entries, labels=[99])


def test_read_target_equals_a_naive_crop_of_the_whole_volume(dataset):
    entry = dataset["entries"][1]
    target = [t for t in build_targets([entry]) if t.label == 2][0]
    image, mask, start = read_target(entry, target, size=16)
    assert start.tolist() == crop_start(target.bbox_min, target.bbox_max, 16).tolist()
    full_label, full_image = np.asarray(entry.open_label()), np.asarray(entry.open_image())[0]
    pad = 16
    padded_label = np.pad(full_label, pad)
    padded_image = np.pad(full_image, pad)
    box = tuple(slice(s + pad, s + pad + 16) for s in start)
    assert np.array_equal(mask, padded_label[box] == 2)
    raw = padded_image[box]
    values = raw[raw > 0]
    assert np.allclose(image, (raw - values.mean()) / values.std(ddof=1), atol=1e-5)  # torchio's z-norm after crop


def test_batches_do_not_depend_on_the_number_of_workers(dataset):
    draw = DrawBatch(dataset["entries"], build_targets(dataset["entries"]), batch_size=2, size=16)
    augment_batch = BatchAugmentation(AUGMENTATION, (16, 16, 16))
    runs = []
    for workers in (0, 2):
        batches = training_batches(draw, seed=5, rank=0, start=3, stop=6, workers=workers,
                                   device=torch.device("cpu"), augment=augment_batch)  # fmt: skip
        runs.append(list(batches))
    for a, b in zip(*runs):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["target"], b["target"])
    # sam_flips: each sample's image and target flipped along the axes its parameters name, nothing else
    flipped_any = False
    for step in range(3, 9):
        batch = draw(np.random.default_rng([5, 0, step]))
        out = augment_batch(batch)
        for b in range(2):
            axes = [a for a in range(3) if batch["aug"]["mirror"][b, a]]
            flipped_any |= bool(axes)
            assert torch.equal(out["image"][b, 0], torch.flip(batch["image"][b, 0], axes))
            assert torch.equal(out["label"][b], torch.flip(batch["label"][b], axes))
    assert flipped_any


def test_native_grid_scores_undo_the_reorientation(dataset):
    entry = dataset["entries"][0]
    target = [t for t in build_targets([entry]) if t.label == 1][0]
    label = next(c.label for c in list_cases(dataset["root"]) if c.case_id == entry.case_id)
    native = NativeGrid({(entry.dataset, entry.case_id): label})
    _, mask, start = read_target(entry, target, size=32)  # the whole target inside the crop
    assert native.scores(entry, target, mask, start, tolerance=1.0) == (1.0, 1.0)
    _, small, start = read_target(entry, target, size=6)  # a crop smaller than the target: the rest is missed
    part = int(small.sum())
    assert 0 < part < target.voxels
    dice, nsd = native.scores(entry, target, small, start, tolerance=1.0)
    assert dice == pytest.approx(2 * part / (part + target.voxels)) and 0 < nsd < 1
