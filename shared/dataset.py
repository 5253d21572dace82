"""Reader for the nnU-Net v2 raw dataset layout: dataset.json, cases, channels as modalities, k-fold splits.

Layout (https://github.com/MIC-DKFZ/nnUNet, documentation/dataset_format.md):
    DatasetXXX_Name/dataset.json                  channel_names, labels, file_ending (numTraining optional)
    DatasetXXX_Name/imagesTr/CASE_0000.nii.gz     one file per channel, 4-digit channel index
    DatasetXXX_Name/labelsTr/CASE.nii.gz          integer label map
    DatasetXXX_Name/imagesTs/...                  optional, same naming
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.atomic import atomic_path
from shared.errors import InputError
from shared.nifti import Volume, read_nifti

MODALITIES = ("T1", "T1ce", "T2", "FLAIR", "DWI")

# lower-case alias -> canonical name; the aliases are the spellings used by BraTS, BIDS and the MoME datasets
_ALIASES = {
    "t1": "T1", "t1w": "T1",
    "t1ce": "T1ce", "t1c": "T1ce", "t1gd": "T1ce", "t1-gd": "T1ce",
    "t2": "T2", "t2w": "T2",
    "flair": "FLAIR", "t2-flair": "FLAIR", "t2flair": "FLAIR",
    "dwi": "DWI", "dw": "DWI", "b1000": "DWI",
}  # fmt: skip
_REQUIRED_KEYS = ("channel_names", "labels", "file_ending")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def canonical_modality(name: str) -> str:
    """Map a channel name to its canonical modality (case-insensitive), e.g. "T1w" -> "T1", "T2-FLAIR" -> "FLAIR".

    Names that are not a known alias come back stripped but otherwise unchanged, so datasets with other
    modalities (CT, PD, ...) still load.
    """
    stripped = str(name).strip()
    return _ALIASES.get(stripped.lower(), stripped)


def declared_label_values(labels: dict) -> tuple:
    """Sorted integer values declared in dataset.json `labels`; region labels (lists of ints) add their union."""
    values = set()
    for value in labels.values():
        values.update(value if isinstance(value, (list, tuple)) else [value])
    return tuple(sorted(int(v) for v in values))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _validate_dataset_json(ds: dict, path) -> dict:
    """Check the keys and value types of a dataset.json dict; raise InputError naming `path` and the key."""
    if not isinstance(ds, dict):
        raise InputError(f"{path}: expected a JSON object at the top level, got {type(ds).__name__}.")
    for key in _REQUIRED_KEYS:
        if key not in ds:
            raise InputError(f"{path}: missing required key '{key}' (needs {', '.join(_REQUIRED_KEYS)}).")
    channels = ds["channel_names"]
    if not isinstance(channels, dict) or not channels:
        raise InputError(f'{path}: key \'channel_names\' must be a non-empty dict like {{"0": "T1"}}.')
    for index in channels:
        if not str(index).isdigit():
            raise InputError(f"{path}: key 'channel_names' has '{index}', which is not a channel index like \"0\".")
    labels = ds["labels"]
    if not isinstance(labels, dict) or not labels:
        raise InputError(f'{path}: key \'labels\' must be a non-empty dict like {{"background": 0, "lesion": 1}}.')
    for name, value in labels.items():
        ok = _is_int(value) or (isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(v) for v in value))
        if not ok:
            raise InputError(f"{path}: key 'labels' maps '{name}' to {value!r}, expected an int or a list of ints.")
    if not isinstance(ds["file_ending"], str) or not ds["file_ending"].startswith("."):
        raise InputError(f"{path}: key 'file_ending' must be a string like \".nii.gz\", got {ds['file_ending']!r}.")
    if "numTraining" in ds and not _is_int(ds["numTraining"]):
        raise InputError(f"{path}: key 'numTraining' must be an int, got {ds['numTraining']!r}.")
    return ds


def load_dataset_json(root) -> dict:
    """Read and validate `<root>/dataset.json`.

    Args:
        root: the dataset folder (DatasetXXX_Name).
    Returns:
        The dict as stored, after checking channel_names, labels, file_ending (and numTraining if present).
    """
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise InputError(f"{path}: dataset.json not found in the dataset folder.")
    try:
        ds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: dataset.json is not valid JSON ({err}).") from err
    return _validate_dataset_json(ds, path)


def write_dataset_json(
    root, channel_names, labels: dict, num_training: int, file_ending: str = ".nii.gz", name=None, **extra
):
    """Write a valid `<root>/dataset.json` atomically (used by the phantom generator).

    Args:
        root: dataset folder, created if needed.
        channel_names: list of names in channel order, or a dict {index: name}.
        labels: {name: int or list of ints}, e.g. {"background": 0, "lesion": 1}.
        num_training: number of training cases.
        file_ending: image file suffix.
        name: dataset name; defaults to the folder name.
        extra: further JSON-serialisable keys (e.g. "description").
    Returns:
        Path of the written file.
    """
    root = Path(root)
    if isinstance(channel_names, dict):
        channels = {str(k): str(v) for k, v in channel_names.items()}
    else:
        channels = {str(i): str(v) for i, v in enumerate(channel_names)}
    ds = {
        "name": name if name is not None else root.name,
        "channel_names": channels,
        "labels": dict(labels),
        "numTraining": int(num_training),
        "file_ending": file_ending,
        **extra,
    }
    path = root / "dataset.json"
    _validate_dataset_json(ds, path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(ds, indent=4))
    return path


@dataclass
class Case:
    """One case of a dataset: its channel files keyed by canonical modality, and its label file.

    `images` lists every channel of dataset.json in channel order; a channel whose file is absent maps to
    None and is named in `missing`.
    """

    case_id: str
    images: dict  # canonical modality -> path (str) or None when the channel file is missing
    label: str | None  # label file, None when there is none (e.g. imagesTs)
    dataset: str  # dataset folder name, e.g. "Dataset001_Tumour"
    missing: list = field(default_factory=list)  # modalities whose file is missing
    label_values: tuple = ()  # integer values declared in dataset.json labels


def list_cases(root, split: str = "Tr") -> list:
    """List the cases of `<root>/images<split>` (and `labels<split>`), sorted by case id.

    A case is any id with a channel file or a label file; missing channel files become missing modalities
    in `Case.missing` instead of an error.

    Args:
        root: the dataset folder.
        split: "Tr" or "Ts".
    Returns:
        list of `Case`.
    """
    root = Path(root)
    ds = load_dataset_json(root)
    ending = ds["file_ending"]
    channels = {int(k): canonical_modality(v) for k, v in ds["channel_names"].items()}
    channels = dict(sorted(channels.items()))
    names = list(channels.values())
    duplicates = sorted({m for m in names if names.count(m) > 1})
    if duplicates:
        raise InputError(f"{root / 'dataset.json'}: channel_names give modality {duplicates} more than once.")
    images_dir, labels_dir = root / f"images{split}", root / f"labels{split}"
    if not images_dir.is_dir():
        raise InputError(f"{images_dir}: image folder not found.")

    found = {}  # case id -> {channel index: path}
    for entry in sorted(images_dir.iterdir()):
        if not entry.name.endswith(ending) or entry.name.startswith("."):
            continue
        match = _CHANNEL_FILE.match(entry.name[: -len(ending)])
        if match is None:
            raise InputError(f"{entry}: image file name must end in _XXXX{ending} with a 4-digit channel index.")
        channel = int(match["channel"])
        if channel not in channels:
            raise InputError(f"{entry}: channel {channel} is not declared in dataset.json channel_names.")
        found.setdefault(match["case"], {})[channel] = str(entry)
    labels = {}
    if labels_dir.is_dir():
        for entry in labels_dir.iterdir():
            if entry.name.endswith(ending) and not entry.name.startswith("."):
                labels[entry.name[: -len(ending)]] = str(entry)

    label_values = declared_label_values(ds["labels"])
    cases = []
    for case_id in sorted(set(found) | set(labels)):
        files = found.get(case_id, {})
        images = {modality: files.get(index) for index, modality in channels.items()}
        cases.append(
            Case(
                case_id=case_id,
                images=images,
                label=labels.get(case_id),
                dataset=root.name,
                missing=[m for m, p in images.items() if p is None],
                label_values=label_values,
            )
        )
    return cases


def _check_same_grid(vol: Volume, ref: Volume, atol: float) -> None:
    """Raise InputError naming `vol.path` if its shape or affine differs from the reference channel."""
    if vol.data.shape != ref.data.shape:
        raise InputError(
            f"{vol.path}: shape {vol.data.shape} differs from {ref.data.shape} of {ref.path} in the same case."
        )
    diff = float(np.abs(vol.affine - ref.affine).max())
    if diff > atol:
        raise InputError(f"{vol.path}: affine differs from that of {ref.path} by up to {diff:.4g} (atol {atol}).")


def load_case(case: Case, modalities=None, check_labels: bool = True, atol: float = 1e-3):
    """Read the channels and label of a case and check that they share one grid.

    Args:
        case: a `Case` from `list_cases`.
        modalities: names (aliases accepted) to load, in this order; None loads every channel of the
            dataset. Requested modalities whose file is missing are skipped.
        check_labels: check that label values are declared in dataset.json.
        atol: largest allowed absolute difference between the 4x4 affines of the channels and the label.
    Returns:
        image: (C, X, Y, Z) float32, one channel per present modality.
        label: (X, Y, Z) int64, or None if the case has no label file.
        reference: the `Volume` of the first present channel (affine and header for writing predictions).
        present: list of the C modality names, in channel order of `image`.
    """
    wanted = list(case.images) if modalities is None else [canonical_modality(m) for m in modalities]
    unknown = [m for m in wanted if m not in case.images]
    if unknown:
        raise InputError(f"modalities: {unknown} are not channels of {case.dataset} (channels: {list(case.images)}).")
    present = [m for m in wanted if case.images[m] is not None]
    if not present:
        raise InputError(f"case {case.case_id} of {case.dataset}: no image file for any of the modalities {wanted}.")
    volumes = [read_nifti(case.images[m]) for m in present]
    ref = volumes[0]
    for vol in volumes[1:]:
        _check_same_grid(vol, ref, atol)
    image = np.stack([v.data for v in volumes]).astype(np.float32, copy=False)  # (C, X, Y, Z)

    label = None
    if case.label is not None:
        lab = read_nifti(case.label, dtype=np.float64)
        if lab.data.shape != ref.data.shape:
            raise InputError(f"{lab.path}: label shape {lab.data.shape} differs from image shape {ref.data.shape}.")
        _check_same_grid(lab, ref, atol)
        values = np.unique(lab.data)
        if not np.array_equal(values, np.round(values)):
            raise InputError(
                f"{lab.path}: label map holds non-integer values such as {values[values != np.round(values)][:3]}."
            )
        label = lab.data.astype(np.int64)
        if check_labels:
            bad = sorted(set(values.astype(np.int64).tolist()) - set(case.label_values))
            if bad:
                raise InputError(
                    f"{lab.path}: label values {bad} are not declared in dataset.json labels "
                    f"(declared: {list(case.label_values)})."
                )
    return image, label, ref, present


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
    if not _is_int(k) or k < 2 or k > len(ids):
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


def read_split_file(path, case_ids, fold: int | None = None) -> dict:
    """{"train": ids, "val": ids} from a split file, checked against the dataset's `case_ids`.

    Accepted layouts:
    - nnU-Net's `splits_final.json`: a list of {"train": [...], "val": [...]}, one per fold (`fold` picks one);
    - BrainSegFounder's / MONAI's `brats21_folds.json`: {"training": [{"fold": k, "image": [...], "label": ...}]}
      (or that list alone): the entries of fold `fold` are the validation cases, the others the training cases;
    - a plain split: {"train": [...], "val": [...]}, or the `split.json` of a run, {dataset name: that}
      (one dataset only; `fold` is not used).

    Raises InputError naming the file when it is unreadable, the fold is out of range, an id is not a case of the
    dataset, or a case is in both lists.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable JSON split file ({err}).") from err
    known = {str(c) for c in case_ids}
    if isinstance(content, dict) and "training" in content:
        content = content["training"]
    if isinstance(content, dict) and len(content) == 1 and isinstance(next(iter(content.values())), dict):
        content = next(iter(content.values()))  # a run's split.json: {dataset name: {"train", "val"}}
    if isinstance(content, list) and content and all(isinstance(e, dict) and "fold" in e for e in content):
        if fold is None or fold < 0:
            raise InputError(f"{path}: a fold list needs a --fold to hold out, got {fold}.")
        folds = sorted({int(e["fold"]) for e in content})
        if fold not in folds:
            raise InputError(f"{path}: no entry has fold {fold} (folds: {folds}).")
        ids = [(_entry_case_id(e, known, str(path)), int(e["fold"]) == fold) for e in content]
        split = {"train": [c for c, v in ids if not v], "val": [c for c, v in ids if v]}
    elif isinstance(content, list) and content and all(isinstance(e, dict) and "train" in e for e in content):
        if fold is None or not 0 <= fold < len(content):
            raise InputError(f"{path}: holds {len(content)} folds, so --fold must lie in [0, {len(content)}), "
                             f"got {fold}.")  # fmt: skip
        split = {"train": list(content[fold]["train"]), "val": list(content[fold].get("val", []))}
    elif isinstance(content, dict) and "train" in content:
        split = {"train": list(content["train"]), "val": list(content.get("val", []))}
    else:
        raise InputError(f"{path}: not a split file (expected nnU-Net's splits_final.json, a BrainSegFounder fold "
                         'list or {"train": [...], "val": [...]}).')  # fmt: skip
    split = {k: [str(c) for c in v] for k, v in split.items()}
    unknown = sorted((set(split["train"]) | set(split["val"])) - known)
    if unknown:
        raise InputError(f"{path}: case id(s) {unknown[:5]} are not cases of the dataset.")
    both = sorted(set(split["train"]) & set(split["val"]))
    if both:
        raise InputError(f"{path}: case id(s) {both[:5]} are in both the training and the validation list.")
    if not split["train"]:
        raise InputError(f"{path}: the training list of fold {fold} is empty.")
    return {"train": sorted(split["train"]), "val": sorted(split["val"])}
