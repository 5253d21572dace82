"""Which label values count as lesion for each modality: MoME's binary targets and the per-modality label rule.

MoME segments one lesion class (background 0, lesion 1); the official code binarises every dataset, so by
default lesion = every declared label value > 0. The paper's Suppl. Table II annotates BraTS T1ce with the
tumour core, not the whole tumour: a per-modality rule states that, e.g.

    --label-rule T1ce=necrosis,enhancing            # label names of dataset.json (or values: T1ce=1,3)
    --label-rule Dataset137_BraTS2021:T1ce="tumor core"   # a region label of one dataset (nnU-Net's BraTS)

A rule `[DATASET:]MODALITY=LABELS` applies to every dataset with that modality, or to the named one only.
LABELS are label names of that dataset's dataset.json (a region label, a list of values, counts as its values)
or integer values declared there; a name that a dataset does not declare is refused, not skipped.
"""

from pathlib import Path

import numpy as np

from shared.dataset import canonical_modality, declared_label_values, load_dataset_json
from shared.errors import InputError


def add_label_rule_arg(parser) -> None:
    """--label-rule, the same flag in training (train_expert, train) and evaluate: which labels are the lesion."""
    parser.add_argument(
        "--label-rule",
        nargs="+",
        default=[],
        help="[DATASET:]MODALITY=LABELS: the lesion of one modality, e.g. T1ce=necrosis,enhancing (the paper's "
        "BraTS T1ce: tumour core); mome/labels.py",
    )


def parse_label_rule(text: str) -> tuple[str | None, str, tuple[str, ...]]:
    """`[DATASET:]MODALITY=LABELS` -> (dataset or None, canonical modality, label names or values as strings)."""
    head, sep, labels = str(text).partition("=")
    dataset, colon, modality = head.rpartition(":")
    items = tuple(item.strip() for item in labels.split(",") if item.strip())
    if not sep or not modality.strip() or not items or (colon and not dataset.strip()):
        raise InputError(
            f"--label-rule {text!r}: expected [DATASET:]MODALITY=LABELS, e.g. T1ce=necrosis,enhancing or T1ce=1,3."
        )
    return (dataset.strip() or None), canonical_modality(modality.strip()), items


def _values_of(item: str, labels: dict, rule: str, root: Path) -> set[int]:
    """The label values that one item of a rule names in a dataset's `labels`."""
    if item in labels:
        value = labels[item]
        values = set(value) if isinstance(value, (list, tuple)) else {value}
    elif item.lstrip("-").isdigit():
        values = {int(item)}
        if int(item) not in declared_label_values(labels):
            raise InputError(f"--label-rule {rule}: value {item} is not a label of {root.name} ({labels}).")
    else:
        raise InputError(
            f"--label-rule {rule}: {root.name} has no label {item!r} (labels: {', '.join(labels)}); restrict the "
            "rule to one dataset as DATASET:MODALITY=LABELS."
        )
    if 0 in values:
        raise InputError(f"--label-rule {rule}: {item!r} includes the background value 0.")
    return {int(v) for v in values}


def lesion_values(data_dirs, rules=()) -> dict[tuple[str, str], tuple[int, ...]]:
    """{(dataset name, modality): label values that are lesion} for every channel of every dataset.

    Args:
        data_dirs: nnU-Net raw dataset folders.
        rules: `--label-rule` texts; later rules override earlier ones for the same dataset and modality.
    """
    parsed = [(text, *parse_label_rule(text)) for text in rules]
    names = {Path(d).name for d in data_dirs}
    for text, dataset, _, _ in parsed:
        if dataset is not None and dataset not in names:
            raise InputError(f"--label-rule {text}: {dataset} is not among the --data folders {sorted(names)}.")
    out = {}
    for root in map(Path, data_dirs):
        ds = load_dataset_json(root)
        modalities = [canonical_modality(v) for v in ds["channel_names"].values()]
        default = tuple(v for v in declared_label_values(ds["labels"]) if v > 0)
        for modality in modalities:
            out[(root.name, modality)] = default
        for text, dataset, modality, items in parsed:
            if dataset not in (None, root.name) or modality not in modalities:
                continue
            values = set()
            for item in items:
                values |= _values_of(item, ds["labels"], text, root)
            out[(root.name, modality)] = tuple(sorted(values))
    for text, dataset, modality, _ in parsed:
        if not any(m == modality and dataset in (None, d) for d, m in out):
            raise InputError(f"--label-rule {text}: no --data dataset has a {modality} channel.")
    return out


def binarise(label: np.ndarray, values) -> np.ndarray:
    """uint8 mask: 1 where `label` holds one of the lesion `values`, else 0."""
    return np.isin(label, list(values)).astype(np.uint8)
