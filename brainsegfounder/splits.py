"""Which cases each stage uses: the held-out cases of fine-tuning, the cases Stage 2 may see, few-shot subsets.

Everything here works on case ids; the images are read by `brainsegfounder.data`.
"""

import math
from pathlib import Path

import numpy as np

from shared.dataset import list_cases
from shared.errors import InputError
from shared.splits import dataset_split, kfold_splits, read_split, split_dataset


def file_split(split_file, data_dir, case_ids, *, fold: int) -> dict:
    """{"train": ids, "val": ids}, sorted, of `data_dir` in a --split-file (`shared.splits.read_split`: nnU-Net's
    splits_final.json, a BSF fold list, a plain split, a run's split.json) with `fold`, checked against `case_ids`.

    Refuses (besides what `read_split` refuses) a file of other datasets only and an empty training list.
    """
    name = Path(data_dir).name
    splits = read_split(split_file, fold=fold, flag="--split-file", case_ids={name: case_ids}, need_train=True)
    split = dataset_split(splits, name, where=f"--split-file {split_file}")
    return {"train": sorted(split["train"]), "val": sorted(split.get("val", []))}


def held_out_split(data_dir, *, fold: int, folds: int, split_file=None, holdout: int = 0,
                   holdout_seed: int = 12345) -> dict:  # fmt: skip
    """{"train": ids, "val": ids} of the labelled cases of one dataset: what fine-tuning trains and validates on,
    and what Stage-2 pretraining must not see (the validation cases).

    In order of precedence: a split file (`file_split`: nnU-Net's splits_final.json, a BSF fold list, a plain
    split) with `fold`; a fixed held-out set of `holdout` cases drawn with `holdout_seed`
    (the paper's ATLAS recipe: 100 held-out training images); the deterministic k-fold split (`fold` -1: none).
    """
    ids = [c.case_id for c in list_cases(data_dir, "Tr") if c.label is not None]
    if split_file is not None:
        return file_split(split_file, data_dir, ids, fold=fold)
    if holdout:
        if not 0 < holdout < len(ids):
            raise InputError(f"--holdout {holdout} must lie in [1, {len(ids)}) for the {len(ids)} labelled cases of "
                             f"{data_dir}.")  # fmt: skip
        val = set(np.random.default_rng(holdout_seed).choice(ids, size=holdout, replace=False).tolist())
        return {"train": [c for c in ids if c not in val], "val": sorted(val)}
    return split_dataset(data_dir, fold=fold, folds=folds)


def pretraining_split(data_dir, *, fold: int, folds: int, split_file=None, holdout: int = 0,
                      transductive: bool = False) -> dict:  # fmt: skip
    """{"train": ids, "val": ids, "imagesTs": ids} of one dataset for self-supervised pretraining.

    Default (no leakage): every imagesTr case except the held-out cases of `held_out_split`, which become the
    SSL validation set (paper Fig. 4), and nothing of imagesTs; unlabelled imagesTr cases (no label file) are
    never held out by fine-tuning, so they are trained on. A dataset without any label file (UK Biobank) is
    split by the k-fold rule over all its cases. `transductive`: every image of imagesTr and imagesTs is trained
    on and nothing is held out, the behaviour before this split existed (the test images are seen, unlabelled;
    fair only when they are never used to score the fine-tuned model).
    """
    cases = list_cases(data_dir, "Tr")
    ids = [c.case_id for c in cases]
    if transductive:
        try:
            test = [c.case_id for c in list_cases(data_dir, "Ts")]
        except InputError:  # imagesTs is optional
            test = []
        return {"train": ids, "val": [], "imagesTs": test}
    if any(c.label is not None for c in cases):
        val = held_out_split(data_dir, fold=fold, folds=folds, split_file=split_file, holdout=holdout)["val"]
    elif split_file is not None:
        val = file_split(split_file, data_dir, ids, fold=fold)["val"]
    elif fold == -1:
        val = []
    else:
        val = split_ids(ids, fold, folds, str(data_dir))
    return {"train": [c for c in ids if c not in set(val)], "val": sorted(val), "imagesTs": []}


def split_ids(ids: list, fold: int, folds: int, where: str) -> list:
    """The validation ids of fold `fold` of the k-fold rule (`shared.splits.kfold_splits`) over `ids`."""
    if not 0 <= fold < folds or folds > len(ids):
        raise InputError(f"--fold {fold} / --folds {folds} do not fit the {len(ids)} cases of {where}.")
    return kfold_splits(ids, k=folds)[fold][1]


def run_seed(seed: int, fraction: float, repeat: int, purpose: int) -> int:
    """A seed for one (fraction, repeat) run, the same in every arm of a study: `purpose` 0 draws the training
    subset, 1 seeds the model initialisation and the batches."""
    return int(np.random.default_rng([seed, round(fraction * 1_000_000), repeat, purpose]).integers(2**31))


def few_shot_subsets(case_ids: list, fraction: float, seed: int, repeats: int) -> list[list]:
    """One training subset of ceil(fraction * N) cases per repeat (paper Fig. 5: 5 random subsets per fraction).

    Repeat r draws from (seed, fraction, r) alone, redrawing (up to 100 times) while its subset equals that of
    an earlier repeat, so small pools still give distinct subsets where they exist. Every arm of a study that
    uses the same seed therefore trains on the same subsets, whatever its number of repeats. `fraction` lies in
    (0, 1] (--train-fraction is parsed by `shared.cli.fraction`).
    """
    n = max(1, math.ceil(fraction * len(case_ids) - 1e-9))  # - 1e-9: 0.1 * 30 is 3.0000000000000004
    subsets: list[list] = []
    for repeat in range(repeats):
        rng = np.random.default_rng(run_seed(seed, fraction, repeat, 0))
        for _ in range(100):
            subset = sorted(case_ids[i] for i in rng.choice(len(case_ids), size=n, replace=False))
            if subset not in subsets:
                break
        subsets.append(subset)
    return subsets
