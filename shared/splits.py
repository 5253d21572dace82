"""Which cases of a dataset train and which are held out: nnU-Net's k-folds, and split files in every layout.

k-folds::

    kfold_splits(case_ids, k=5)                 # [(train ids, val ids)] per fold, nnU-Net v2's splits_final.json
    split_dataset(root, fold=0, folds=5)        # {"train": ids, "val": ids} of the labelled cases of a dataset
    split_datasets(data_dirs, fold=0, folds=5)  # {dataset folder name: that} of several

Split files, each read by `read_split` into one representation, {dataset name or None: {"train": ids, "val": ids}}
("test" instead of or beside "val" where the file says so; None where the file names no dataset):
- a run's OUT/split.json and the paper's fixed splits: {dataset: {"train": [...], "val" or "test": [...]}};
- a plain split: {"train": [...], "val": [...]};
- nnU-Net's splits_final.json: a list of folds [{"train": [...], "val": [...]}, ...], of which `fold` is read;
- BrainSegFounder's / MONAI's brats21_folds.json: {"training": [{"fold": k, "image": [...], "label": ...}]} (or
  that list alone): the entries of fold `fold` are the validation cases, the others the training cases.
Given the case ids of the datasets at hand, it gives an unnamed split to the dataset that holds its ids and checks
every split of those datasets against their cases; `dataset_split` then picks the split of one dataset. A training
run records its split with `write_split` (OUT/split.json).
"""

import json
import re
from pathlib import Path

import numpy as np

from shared.atomic import atomic_path
from shared.cli import read_json_file
from shared.dataset import list_cases
from shared.errors import InputError, short_list

PARTS = ("train", "val", "test")  # the id lists a split may hold; "train" is always there


# ----------------------------------------------------------------------------- k-folds


def kfold_splits(case_ids, k: int = 5, seed: int = 12345) -> list:
    """Deterministic k-fold cross-validation split by case id, the procedure of nnU-Net v2's splits_final.json.

    The ids are sorted, their indices shuffled with `np.random.RandomState(seed)`, and the shuffled list is cut
    into k contiguous folds whose sizes differ by at most one (the first n % k folds get one more), as
    scikit-learn's KFold(shuffle=True, random_state=seed) that nnU-Net calls with seed 12345.

    Args:
        case_ids: iterable of unique case ids; their order does not matter.
        k: number of folds, 2 <= k <= number of cases.
        seed: shuffling seed.
    Returns:
        list of k (train_ids, val_ids) pairs, both sorted; every case is in exactly one val list.
    """
    ids = sorted(str(c) for c in case_ids)
    if len(set(ids)) != len(ids):
        duplicates = sorted({c for c in ids if ids.count(c) > 1})
        raise InputError(f"case_ids: duplicate case ids {duplicates}.")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 2 or k > len(ids):
        raise InputError(f"k: number of folds must be between 2 and the number of cases ({len(ids)}), got {k}.")
    order = np.random.RandomState(seed).permutation(len(ids))
    sizes = np.full(k, len(ids) // k)
    sizes[: len(ids) % k] += 1
    splits, start = [], 0
    for size in sizes:
        val_idx = set(order[start : start + size].tolist())
        start += size
        train = [c for i, c in enumerate(ids) if i not in val_idx]
        val = [c for i, c in enumerate(ids) if i in val_idx]
        splits.append((train, val))
    return splits


def split_dataset(root, fold: int, folds: int, seed: int = 12345) -> dict:
    """{"train": ids, "val": ids} of the labelled cases of one dataset from `kfold_splits` (fold -1: all train).

    Raises InputError naming the folder or flag when there is no labelled case, the fold is out of range, or
    there are fewer cases than folds.
    """
    ids = [c.case_id for c in list_cases(root) if c.label is not None]
    if not ids:
        raise InputError(f"{root}: no labelled training case found in imagesTr/labelsTr.")
    if fold == -1:
        return {"train": ids, "val": []}
    if not 0 <= fold < folds:
        raise InputError(f"--fold must be -1 or in [0, {folds}), got {fold}.")
    if len(ids) < folds:
        raise InputError(f"{root}: {len(ids)} labelled cases cannot be split into --folds {folds}.")
    train, val = kfold_splits(ids, k=folds, seed=seed)[fold]
    return {"train": list(train), "val": list(val)}


def split_datasets(data_dirs, *, fold: int, folds: int, seed: int = 12345) -> dict[str, dict]:
    """{dataset folder name: `split_dataset` of it} for the --data folders of a training run."""
    return {Path(root).name: split_dataset(root, fold, folds, seed=seed) for root in data_dirs}


# ----------------------------------------------------------------------------- split files


def write_split(path, split: dict) -> None:
    """Write a run's OUT/split.json, {dataset folder name: {"train": ids, "val": ids, ...}}, atomically (its folder
    is created); `read_split` and the evaluate CLIs' --split read it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(split, indent=1))


def _id_list(value, where: str) -> list[str]:
    """`value` if it is a list of case ids (strings), else an InputError naming `where`."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where} must be a list of case ids.")
    return value


def _entry(value, where: str) -> dict:
    """One split as the file gives it, {"train": ids} plus "val" and/or "test"; a case both trained on and held
    out is refused."""
    if not isinstance(value, dict) or "train" not in value:
        raise InputError(f'{where}: expected {{"train": [...], "val": [...]}}.')
    entry = {part: _id_list(value[part], f"{where} {part}") for part in PARTS if part in value}
    for part in PARTS[1:]:
        both = sorted(set(entry["train"]) & set(entry.get(part, ())))
        if both:
            raise InputError(f"{where}: case id(s) {both[:5]} are in both 'train' and '{part}'.")
    return entry


def _entry_case_id(entry: dict, known: set, where: str) -> str:
    """Case id of one BSF / MONAI fold-list entry ({"fold", "image": [paths], "label": path}) among `known` ids.

    The paths are the original BraTS layout (`TrainingData/BraTS2021_00000/BraTS2021_00000_flair.nii.gz`) or an
    nnU-Net one (`imagesTr/BraTS2021_00000_0000.nii.gz`); the id is the first of the parent folder name, the file
    name without its ending, without a `_seg` / modality / `_XXXX` suffix, that is a case of the dataset.
    """
    paths = [entry.get("label")] + list(entry.get("image") or [])
    for path in (p for p in paths if isinstance(p, str)):
        name = Path(path).name
        stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
        candidates = [Path(path).parent.name, stem, re.sub(r"_(\d{4}|seg|flair|t1ce|t1|t2)$", "", stem)]
        for candidate in candidates:
            if candidate in known:
                return candidate
    raise InputError(f"{where}: entry {entry!r} names no case of the dataset.")


def _fold_of(folds: list, fold: int | None, path: Path, flag: str, known: dict | None) -> dict:
    """The split of fold `fold` of a list of folds: nnU-Net's splits_final.json or a BrainSegFounder fold list."""
    where = f"{flag} {path}"
    by_entry = all(isinstance(e, dict) and "fold" in e for e in folds)  # BSF: one entry per case, not per fold
    if by_entry:
        if not all(isinstance(e["fold"], int) and not isinstance(e["fold"], bool) for e in folds):
            raise InputError(f'{where}: every entry\'s "fold" must be a fold number.')
        values, kind = sorted({e["fold"] for e in folds}), "a BrainSegFounder fold list"
    else:
        values, kind = list(range(len(folds))), "an nnU-Net splits_final.json"
    if fold is None:
        raise InputError(f"{where} is {kind} of {len(values)} folds; pass --fold.")
    if fold not in values:
        shown = f"0 to {len(values) - 1}" if values == list(range(len(values))) else ", ".join(map(str, values))
        raise InputError(f"--fold {fold}: {path} holds folds {shown}.")
    if not by_entry:
        return _entry(folds[fold], f"{where} fold {fold}")
    if known is None:
        raise InputError(f"{where} is {kind}, which names cases by image path; it is read only against the cases "
                         "of a dataset.")  # fmt: skip
    ids = set().union(*known.values())
    cases = [(_entry_case_id(e, ids, where), e["fold"] == fold) for e in folds]
    return {"train": [c for c, held in cases if not held], "val": [c for c, held in cases if held]}


def _checked(splits: dict, known: dict, where: str, need_train: bool) -> dict:
    """`splits` with an unnamed split given to the dataset whose cases hold its ids (the only dataset, if there
    is one) and every split of a dataset of `known` checked against its case ids."""
    names, out = list(known), {}
    for name, entry in splits.items():
        ids = {c for part in entry.values() for c in part}
        if name is None:
            owners = names if len(names) == 1 else [n for n in names if ids <= known[n]]
            if len(owners) != 1:
                raise InputError(f"{where}: its case ids belong to {'several' if owners else 'none'} of the --data "
                                 f"datasets {names}.")  # fmt: skip
            name = owners[0]
        if name in known:
            unknown = sorted(ids - known[name])
            if unknown:
                raise InputError(f"{where}: {name} has no case(s) {unknown[:5]}.")
            if need_train and not entry["train"]:
                raise InputError(f"{where}: the training list of {name} is empty.")
        out[name] = entry
    return out


def read_split(path, *, fold: int | None = None, flag: str = "--split", case_ids: dict | None = None,
               strict_fold: bool = False, need_train: bool = False) -> dict:  # fmt: skip
    """The splits of a split file in any layout of the module docstring, as {dataset name or None: split}.

    Args:
        path: the file.
        fold: the fold of a list of folds (nnU-Net's, BrainSegFounder's); None refuses such a file.
        flag: the flag that named `path`, for messages.
        case_ids: {dataset folder name: its case ids} of the datasets at hand, or None (nothing to check against;
            a BrainSegFounder fold list, which names cases by image path, is then refused). Given, an unnamed split
            is returned under the name of the dataset that holds all its ids, and the ids of every split of these
            datasets must be cases of it.
        strict_fold: refuse a `fold` for a file of one split (for CLIs whose --fold only picks a fold of the file).
        need_train: refuse an empty training list of a dataset of `case_ids`.
    Returns:
        {name: {"train": ids, "val" and/or "test": ids}}, lists as in the file; a case id is never in "train" and
        a held-out list.
    Raises InputError, one sentence naming `flag` and the file (or --fold), for a missing or unreadable file, a
    layout it is not, a fold it does not hold, ids that are not lists of strings, a case both trained on and held
    out, ids that are not cases of their dataset, and (with `case_ids`) an unnamed split of no or several datasets.
    """
    path = Path(path)
    where = f"{flag} {path}"
    content = read_json_file(path, flag, "JSON split file")
    known = None if case_ids is None else {name: {str(c) for c in ids} for name, ids in case_ids.items()}
    if isinstance(content, dict) and isinstance(content.get("training"), list):
        content = content["training"]  # BrainSegFounder's / MONAI's brats21_folds.json
    if isinstance(content, list) and content:
        splits = {None: _fold_of(content, fold, path, flag, known)}
    elif isinstance(content, dict) and content:
        plain = isinstance(content.get("train"), list)
        if strict_fold and fold is not None:
            kind = 'a plain {"train", "val"} split' if plain else "a split.json of a training run"
            raise InputError(f"--fold {fold}: {path} is {kind} (one split), not a list of folds.")
        if plain:
            splits = {None: _entry(content, where)}
        else:
            splits = {name: _entry(value, f"{where} [{name}]") for name, value in content.items()}
    else:
        raise InputError(f'{where}: expected {{dataset: {{"train": [...], "val": [...]}}}}, {{"train": [...], '
                         '"val": [...]} or a list of folds.')  # fmt: skip
    return splits if known is None else _checked(splits, known, where, need_train)


def dataset_split(splits: dict, dataset: str | None = None, *, where: str) -> dict:
    """The split of one dataset among `read_split`'s: the unnamed one, the one named `dataset`, or the only one.

    Args:
        splits: `read_split`'s result.
        dataset: the dataset folder name whose split is wanted; None when it is not known.
        where: the flag and file, for messages ("--split runs/a/split.json").
    Raises InputError when the file holds other datasets' splits only, or several and `dataset` is None.
    """
    if None in splits:
        return splits[None]
    if dataset is not None:
        if dataset not in splits:
            raise InputError(f"{where} holds the splits of {short_list(splits)}, not of {dataset}.")
        return splits[dataset]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise InputError(f"{where} holds the splits of several datasets ({short_list(splits)}); which one is meant is "
                     "not known here.")  # fmt: skip
