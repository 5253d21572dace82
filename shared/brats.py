"""Which label values are the BraTS classes (necrosis, edema, enhancing), for the TC / WT / ET regions.

Label values differ between distributions (BraTS 2021 files: necrosis 1, edema 2, enhancing 4; nnU-Net's
conversion: edema 1, necrosis 2, enhancing 3), so no default is safe. The values come, in this order, from
`--brats-labels` (an explicit override) or the label names of the dataset's `dataset.json`
(`shared.metrics.brats_labels_from_names`); when neither determines them, the command refuses in one sentence.
Used by shared.evaluate, brainsegfounder (fine-tuning targets, prediction, scoring) and mome (the BraTS T1ce
tumour-core label rule).
"""

from pathlib import Path

from shared.dataset import declared_label_values, load_dataset_json
from shared.errors import InputError
from shared.metrics import brats_labels_from_names

HINT = "pass --brats-labels NECROSIS EDEMA ENHANCING (BraTS 2021 files: 1 2 4; nnU-Net's conversion: 2 1 3)"


def labels_from_dataset(root, explicit=None) -> tuple[tuple[int, int, int], str]:
    """(necrosis, edema, enhancing) for a dataset folder, and where they came from (for the log).

    `explicit` (--brats-labels) wins but must name values that dataset.json declares; otherwise the label names
    decide. Raises InputError in one sentence when neither does (e.g. a binary lesion dataset).
    """
    ds = load_dataset_json(root)
    path = Path(root) / "dataset.json"
    if explicit is not None:
        explicit = tuple(int(v) for v in explicit)
        undeclared = sorted(set(explicit) - set(declared_label_values(ds["labels"])))
        if undeclared or len(set(explicit)) != 3 or min(explicit) < 1:
            raise InputError(f"--brats-labels {list(explicit)}: {path} declares labels "
                             f"{list(declared_label_values(ds['labels']))}, so these cannot be three of its "
                             "tumour classes.")  # fmt: skip
        return explicit, "--brats-labels"
    values, why = brats_labels_from_names(ds["labels"])
    if values is None:
        raise InputError(f"{path} does not determine the BraTS regions ({why}); {HINT}.")
    return values, f"the label names of {path}"


def dataset_beside(folder) -> Path | None:
    """The dataset folder of a `labelsTr` / `labelsTs` / `imagesTr` / `imagesTs` folder that has a dataset.json."""
    folder = Path(folder)
    if folder.name in ("labelsTr", "labelsTs", "imagesTr", "imagesTs") and (folder.parent / "dataset.json").is_file():
        return folder.parent
    return None


def brats_values_for_gt(gt_dir, explicit=None) -> tuple[tuple[int, int, int], str]:
    """(necrosis, edema, enhancing) for scoring `gt_dir`, and their source: --brats-labels, or the names in the
    dataset.json beside a labelsTr/labelsTs folder; refuses in one sentence when neither is there."""
    root = dataset_beside(gt_dir)
    if root is not None:
        return labels_from_dataset(root, explicit)
    if explicit is not None:
        return tuple(int(v) for v in explicit), "--brats-labels"
    raise InputError(f"--gt {gt_dir} is not the labelsTr/labelsTs folder of a dataset with a dataset.json naming "
                     f"its labels; {HINT}.")  # fmt: skip


def describe(values, source: str) -> str:
    necrosis, edema, enhancing = values
    return f"BraTS labels: necrosis {necrosis}, edema {edema}, enhancing {enhancing} (from {source})"
