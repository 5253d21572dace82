"""Train/test splits: deterministic k-folds, or fixed splits from files (`--split-file`).

A split file is either
- a mapping {dataset folder name: {"train": [case ids], "test": [case ids]}} (the paper's fixed splits; the
  `split.json` of a run, with "val" instead of "test", is one too), or
- nnU-Net's `splits_final.json`: a list of folds [{"train": [...], "val": [...]}, ...] of one dataset, of which
  `--fold` is used; its case ids tell which --data dataset it belongs to.
Several files may be given (e.g. one splits_final.json per dataset); a dataset may be defined once.
"""

import json
from pathlib import Path

from shared.dataset import list_cases, split_dataset
from shared.errors import InputError

HELD_OUT = ("test", "val")  # the key of the held-out cases, in order of preference


def kfold_split(data_dirs, fold: int, folds: int, seed: int = 12345) -> dict:
    """{dataset name: {"train": ids, "val": ids}} from nnU-Net's k-fold split of each dataset (`fold=-1`: all train)."""
    return {Path(root).name: split_dataset(root, fold, folds, seed=seed) for root in data_dirs}


def _ids(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where} must be a list of case ids (strings).")
    return value


def _entry(value, where: str) -> dict:
    if not isinstance(value, dict) or "train" not in value:
        raise InputError(f"{where} must be an object with a 'train' list (and 'test' or 'val').")
    entry = {key: _ids(value[key], f"{where}['{key}']") for key in ("train", *HELD_OUT) if key in value}
    for key in HELD_OUT:
        overlap = sorted(set(entry["train"]) & set(entry.get(key, [])))
        if overlap:
            raise InputError(f"{where}: case ids {overlap[:5]} are in both 'train' and '{key}'.")
    return entry


def read_split_files(paths, data_dirs, fold: int = 0) -> dict[str, dict]:
    """{dataset name: {"train": ids, "test" and/or "val": ids}} from split files (see the module docstring).

    Args:
        paths: the `--split-file` values.
        data_dirs: the `--data` folders (to match nnU-Net split lists to their dataset by case id).
        fold: the fold of an nnU-Net splits_final.json.
    """
    names = [Path(d).name for d in data_dirs]
    case_ids = {Path(d).name: {c.case_id for c in list_cases(d)} for d in data_dirs}
    for d in data_dirs:  # a fixed test split may name imagesTs cases
        if (Path(d) / "imagesTs").is_dir():
            case_ids[Path(d).name] |= {c.case_id for c in list_cases(d, "Ts")}
    out: dict[str, dict] = {}
    for path in map(Path, paths):
        try:
            content = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"--split-file {path}: not a readable JSON split ({err}).") from err
        if isinstance(content, list):  # nnU-Net splits_final.json of one dataset
            if not 0 <= fold < len(content):
                raise InputError(f"--split-file {path} has {len(content)} folds; --fold {fold} is not one of them.")
            entry = _entry(content[fold], f"--split-file {path} fold {fold}")
            every = set(entry["train"]) | set(entry.get("val", []))
            owners = [n for n in names if every <= case_ids[n]]
            if len(owners) != 1:
                raise InputError(
                    f"--split-file {path}: its case ids belong to {'none' if not owners else 'several'} of the "
                    f"--data datasets {names}."
                )
            found = {owners[0]: entry}
        elif isinstance(content, dict):
            found = {name: _entry(value, f"--split-file {path} [{name!r}]") for name, value in content.items()}
        else:
            raise InputError(f"--split-file {path}: expected a JSON object or nnU-Net's list of folds.")
        for name, entry in found.items():
            if name in out:
                raise InputError(f"--split-file {path}: dataset {name} is split twice.")
            if name in case_ids:
                unknown = sorted({c for ids in entry.values() for c in ids} - case_ids[name])
                if unknown:
                    raise InputError(f"--split-file {path}: {name} has no case(s) {unknown[:5]}.")
            out[name] = entry
    return out


def training_split(data_dirs, split_files, fold: int, folds: int) -> dict[str, dict]:
    """The split a training run uses and writes to split.json: from --split-file, else nnU-Net's k-fold split."""
    if not split_files:
        return kfold_split(data_dirs, fold=fold, folds=folds)
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
