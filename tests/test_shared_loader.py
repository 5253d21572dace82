"""Checks the step-indexed loader: batches are a pure function of (seed, rank, step), with any worker count,
and a resumed range continues the same stream: pytest -q tests/test_shared_loader.py"""

import numpy as np
import pytest
import torch

from shared.augment import PIPELINES, BatchAugmentation, apply_augmentation, initial_patch_size, sample_params
from shared.cache import Preprocessing, build_cache
from shared.errors import InputError
from shared.loader import StepBatches, default_workers, step_rng, training_batches
from shared.sampling import forced_foreground, patch_start, read_region
from tests.test_shared_cache import make_dataset


class DrawPatches:
    """A small batch builder as the packages write them: random case, foreground-or-random patch, noise seed."""

    def __init__(self, entries, patch=(4, 4, 4)):
        self.entries, self.patch = entries, patch

    def __call__(self, rng):
        images, labels = [], []
        for j in range(2):
            case = self.entries[int(rng.integers(len(self.entries)))]
            start = patch_start(case, self.patch, self.patch, rng, foreground=j == 1)
            images.append(read_region(case.open_image(), start, self.patch))
            labels.append(read_region(case.open_label(), start, self.patch))
        return {"image": torch.from_numpy(np.stack(images)), "label": torch.from_numpy(np.stack(labels)),
                "noise_seed": int(rng.integers(2**31))}  # fmt: skip


def add_noise(batch):
    """A stand-in augmentation that uses torch randomness seeded from the batch, as shared.augment does."""
    generator = torch.Generator().manual_seed(batch["noise_seed"])
    noise = torch.randn(batch["image"].shape, generator=generator)
    return {**batch, "image": torch.tanh(batch["image"] @ torch.ones(4, 4) + noise)}


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Tiny")
    return build_cache(root, Preprocessing(normalise="zscore"), cache_root=root.parent / "cache", progress=False)


def collect(entries, workers, start=0, stop=6, seed=3, rank=0):
    batches = training_batches(DrawPatches(entries), seed=seed, rank=rank, start=start, stop=stop, workers=workers,
                               device=torch.device("cpu"), augment=add_noise)  # fmt: skip
    return list(batches)


def test_same_batches_with_zero_and_two_workers(entries):
    serial, parallel = collect(entries, 0), collect(entries, 2)
    assert [b["step"] for b in parallel] == list(range(6))
    for a, b in zip(serial, parallel):
        torch.testing.assert_close(a["image"], b["image"], rtol=1e-6, atol=1e-6)
        assert torch.equal(a["label"], b["label"])


def test_a_resumed_range_continues_the_uninterrupted_stream(entries):
    whole = collect(entries, 1, start=0, stop=6)
    resumed = collect(entries, 1, start=4, stop=6)
    for a, b in zip(whole[4:], resumed):
        assert a["step"] == b["step"] and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_steps_ranks_and_seeds_give_different_batches(entries):
    base = collect(entries, 0, stop=3)
    assert not torch.equal(base[0]["image"], base[1]["image"])
    assert not torch.equal(base[0]["image"], collect(entries, 0, stop=1, rank=1)[0]["image"])
    assert not torch.equal(base[0]["image"], collect(entries, 0, stop=1, seed=4)[0]["image"])


def test_step_rng_is_a_function_of_its_three_ints():
    assert step_rng(1, 0, 5).integers(1 << 30) == step_rng(1, 0, 5).integers(1 << 30)
    assert step_rng(1, 0, 5).integers(1 << 30) != step_rng(1, 0, 6).integers(1 << 30)
    with pytest.raises(InputError, match="non-negative"):
        step_rng(-1, 0, 0)


def test_dataset_item_is_the_step_batch_and_augments_in_place_of_the_worker(entries):
    dataset = StepBatches(DrawPatches(entries), seed=3, rank=0, augment=add_noise)
    item = dataset[4]
    raw = DrawPatches(entries)(step_rng(3, 0, 4))
    torch.testing.assert_close(item["image"], add_noise(raw)["image"])
    assert item["step"] == 4


def test_default_workers_and_bad_worker_count():
    assert default_workers(torch.device("cpu")) >= 0
    with pytest.raises(InputError, match="--workers"):
        next(training_batches(lambda rng: {}, seed=0, rank=0, start=0, stop=1, workers=-1,
                              device=torch.device("cpu")))  # fmt: skip


class DrawForAugmentation:
    """A batch as the packages draw it for nnU-Net's augmentation: read region, labels padded with -1, params.
    Two patches, the second forced to foreground (also the batch of tests/bench_data_engine.py)."""

    def __init__(self, entries, patch=(8, 8, 8)):
        self.entries, self.patch = entries, patch
        self.read = initial_patch_size(patch, PIPELINES["nnunet"])

    def __call__(self, rng):
        images, labels = [], []
        for j in range(2):
            case = self.entries[int(rng.integers(len(self.entries)))]
            start = patch_start(case, self.read, self.patch, rng, foreground=forced_foreground(j, 2, 0.33))
            images.append(read_region(case.open_image(), start, self.read))
            labels.append(read_region(case.open_label(), start, self.read, fill=-1, dtype=np.int16))
        channels = images[0].shape[0]
        return {"image": torch.from_numpy(np.stack(images)), "label": torch.from_numpy(np.stack(labels)).long(),
                "aug": sample_params(PIPELINES["nnunet"], 2, channels, rng)}  # fmt: skip


def test_nnunet_augmentation_in_workers_is_the_same_as_in_the_main_process(entries):
    draw, augment = DrawForAugmentation(entries), BatchAugmentation(PIPELINES["nnunet"], (8, 8, 8))
    runs = [list(training_batches(draw, seed=5, rank=0, start=0, stop=4, workers=w, device=torch.device("cpu"),
                                  augment=augment)) for w in (0, 2)]  # fmt: skip
    for a, b in zip(*runs):
        assert a["image"].shape == (2, 2, 8, 8, 8) and "aug" not in a
        torch.testing.assert_close(a["image"], b["image"], rtol=1e-5, atol=1e-5)
        assert torch.equal(a["label"], b["label"]) and a["label"].min() >= 0  # -1 padding cleaned to 0
    raw = draw(step_rng(5, 0, 2))
    expected, _ = apply_augmentation(raw["image"], raw["label"], raw["aug"], PIPELINES["nnunet"], (8, 8, 8))
    torch.testing.assert_close(runs[0][2]["image"], expected)
