"""Which label values are the BraTS classes, for the TC / WT / ET regions of fine-tuning, prediction and scoring.

Label values differ between distributions (BraTS 2021 files: necrosis 1, edema 2, enhancing 4; nnU-Net's
conversion: edema 1, necrosis 2, enhancing 3), so no default is safe. The values come, in this order, from
`--brats-labels` (an explicit override), the label names of the dataset's `dataset.json`
(`shared.metrics.brats_labels_from_names`), or a model's record of what it was trained on; when none of these
determines them, the command refuses in one sentence.
"""

from pathlib import Path

import numpy as np
import torch

from shared.dataset import declared_label_values, load_dataset_json
from shared.errors import InputError
from shared.metrics import brats_labels_from_names, brats_regions

REGIONS = ("TC", "WT", "ET")  # the order of the three sigmoid output channels (BSF, MONAI)
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


def describe(values, source: str) -> str:
    necrosis, edema, enhancing = values
    return f"BraTS labels: necrosis {necrosis}, edema {edema}, enhancing {enhancing} (from {source})"


def region_targets(label: np.ndarray, values) -> np.ndarray:
    """(3, ...) float32 multi-label target [TC, WT, ET] of an integer label map (or a batch of them)."""
    necrosis, edema, enhancing = values
    masks = brats_regions(label, necrosis=necrosis, edema=edema, enhancing=enhancing)
    return np.stack([masks[name] for name in REGIONS]).astype(np.float32)


def regions_to_labels(masks: np.ndarray, values) -> np.ndarray:
    """(3, X, Y, Z) boolean [TC, WT, ET] -> (X, Y, Z) uint8 label map, as BSF's `test.py` writes it: WT -> edema,
    then TC -> necrosis, then ET -> enhancing (later regions overwrite earlier ones)."""
    necrosis, edema, enhancing = values
    tc, wt, et = masks
    labels = np.zeros(masks.shape[1:], dtype=np.uint8)
    labels[wt] = edema
    labels[tc] = necrosis
    labels[et] = enhancing
    return labels


def region_channels(label: torch.Tensor, target: str, values=None) -> torch.Tensor:
    """Training targets of a batch of label maps on any device: (B, X, Y, Z) int -> (B, K, X, Y, Z) float32,
    [TC, WT, ET] of the (necrosis, edema, enhancing) `values` (K=3), or label > 0 (K=1, target "binary")."""
    if target == "binary":
        return (label > 0)[:, None].float()
    necrosis, edema, enhancing = values
    tc = (label == necrosis) | (label == enhancing)
    wt = tc | (label == edema)
    return torch.stack([tc, wt, label == enhancing], dim=1).float()
