"""Reader for the nnU-Net v2 raw dataset layout: dataset.json, cases, channels as modalities (k-folds and split
files: `shared.splits`).

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


def check_declared(path, values, declared, source: str = "dataset.json") -> None:
    """Refuse a label map holding values that `source` does not declare: they would be scored or trained as nothing.

    Args:
        path: the label map (named in the error).
        values: the values it holds (any iterable of integers, e.g. `np.unique(labels)`).
        declared: the label values `source` declares.
    """
    bad = sorted(set(int(v) for v in values) - set(int(v) for v in declared))
    if bad:
        raise InputError(
            f"{path}: label values {bad} are not declared in {source} labels (declared: {list(declared)})."
        )


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
            check_declared(lab.path, values, case.label_values)
    return image, label, ref, present
