"""Train/test splits: deterministic k-folds, or fixed splits from files (`--split-file`).

A split file is read by `shared.splits.read_split`, usually
- a mapping {dataset folder name: {"train": [case ids], "test": [case ids]}} (the paper's fixed splits; the
  `split.json` of a run, with "val" instead of "test", is one too), or
- nnU-Net's `splits_final.json`: a list of folds [{"train": [...], "val": [...]}, ...] of one dataset, of which
  `--fold` is used; its case ids tell which --data dataset it belongs to.
Several files may be given (e.g. one splits_final.json per dataset); a dataset may be defined once.
"""

from pathlib import Path

from shared.dataset import list_cases
from shared.errors import InputError
from shared.splits import read_split, split_datasets

HELD_OUT = ("test", "val")  # the key of the held-out cases, in order of preference


def read_split_files(paths, data_dirs, fold: int = 0) -> dict[str, dict]:
    """{dataset name: {"train": ids, "test" and/or "val": ids}} from split files (see the module docstring).

    Args:
        paths: the `--split-file` values.
        data_dirs: the `--data` folders (to match nnU-Net split lists to their dataset by case id).
        fold: the fold of an nnU-Net splits_final.json.
    """
    case_ids = {Path(d).name: {c.case_id for c in list_cases(d)} for d in data_dirs}
    for d in data_dirs:  # a fixed test split may name imagesTs cases
        if (Path(d) / "imagesTs").is_dir():
            case_ids[Path(d).name] |= {c.case_id for c in list_cases(d, "Ts")}
    out: dict[str, dict] = {}
    for path in paths:
        for name, entry in read_split(path, fold=fold, flag="--split-file", case_ids=case_ids).items():
            if name in out:
                raise InputError(f"--split-file {path}: dataset {name} is split twice.")
            out[name] = entry
    return out


def training_split(data_dirs, split_files, fold: int, folds: int) -> dict[str, dict]:
    """The split a training run uses and writes to split.json: from --split-file, else nnU-Net's k-fold split."""
    if not split_files:
        return split_datasets(data_dirs, fold=fold, folds=folds)
    split = read_split_files(split_files, data_dirs, fold=max(fold, 0))
    missing = [Path(d).name for d in data_dirs if Path(d).name not in split]
    if missing:
        raise InputError(f"--split-file gives no split for the --data dataset(s) {missing}.")
    return {Path(d).name: split[Path(d).name] for d in data_dirs}


def held_out(entry: dict, subset: str | None = None) -> list[str]:
    """The cases of a split entry to evaluate: `subset` ("train", "val", "test"), else "test" or else "val"."""
    if subset is not None:
        if subset not in entry:
            raise InputError(f"--subset {subset}: the split has no '{subset}' list (it has {sorted(entry)}).")
        return entry[subset]
    for key in HELD_OUT:
        if key in entry:
            return entry[key]
    raise InputError(f"the split lists no held-out cases ('test' or 'val'), only {sorted(entry)}.")
