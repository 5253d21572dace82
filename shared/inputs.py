"""Input conventions of the predict and evaluate CLIs: which images to segment, which cases to score.

predict: `--input` is a NIfTI file, a folder of NIfTI files, or an nnU-Net dataset folder; `--split Tr|Ts` picks a
dataset's imagesTr or imagesTs, `--cases` a subset; `--output` is a folder::

    add_input_args(parser)
    args = parser.parse_args(argv)
    cases = inputs_from_args(args)                       # refuses bad inputs and outputs before any work
    for case in cases:
        images = case.images(model_modalities)         # {modality: file or None}, or case.as_case(...)

evaluate: `--cases` or `--split FILE` (OUT/split.json of a training run, nnU-Net's splits_final.json with `--fold`,
or a plain {"train", "val"} split; read by `shared.splits.read_split`) scores a subset::

    add_subset_args(parser)
    ids = selected_cases(args.cases, args.split, fold=args.fold, subset=args.subset, dataset=name)  # None: all
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

from shared.cli import check_output_dir, non_negative_int
from shared.dataset import Case, canonical_modality, declared_label_values, list_cases, load_dataset_json
from shared.errors import InputError, short_list
from shared.splits import dataset_split, read_split

NIFTI_ENDINGS = (".nii.gz", ".nii")
SPLITS = ("Tr", "Ts")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def nifti_stem(name: str) -> str | None:
    """File name without its NIfTI ending ("a_0000.nii.gz" -> "a_0000"), or None for other and hidden files."""
    if name.startswith("."):
        return None
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def split_channel(stem: str) -> tuple[str, int]:
    """(case id, channel index) of a file stem: "BRATS_001_0002" -> ("BRATS_001", 2); "scan" -> ("scan", 0)."""
    match = _CHANNEL.match(stem)
    return (match["case"], int(match["channel"])) if match else (stem, 0)


@dataclass(frozen=True)
class InputCase:
    """One case to segment: its channel files by channel index, and what a dataset folder says about them."""

    case_id: str
    files: dict  # channel index -> Path, in channel order
    channel_names: dict = field(default_factory=dict)  # index -> canonical modality (dataset.json); {} outside one
    label: Path | None = None  # labels<split>/CASE file of a dataset, if there is one
    dataset: str = ""  # dataset folder name, else the folder (or the file's folder) name
    label_values: tuple = ()  # label values declared in dataset.json

    def images(self, modalities) -> dict:
        """The files keyed by the model's `modalities` (in its channel order), None for a missing one.

        In a dataset folder a file is matched by its channel name (dataset.json may order channels differently from
        the model); elsewhere channel index i is the model's modality i.
        """
        modalities = [canonical_modality(m) for m in modalities]
        if self.channel_names:
            by_name = {name: self.files.get(index) for index, name in self.channel_names.items()}
            return {m: by_name.get(m) for m in modalities}
        extra = sorted(index for index in self.files if index >= len(modalities))
        if extra:
            raise InputError(
                f"{self.files[extra[0]]}: channel {extra[0]:04d} has no modality; the model takes {len(modalities)} "
                f"channel(s), {' '.join(modalities)} (files CASE_0000 to CASE_{len(modalities) - 1:04d})."
            )
        return {m: self.files.get(i) for i, m in enumerate(modalities)}

    def as_case(self, modalities) -> Case:
        """A `shared.dataset.Case` with `images(modalities)`, for the loaders that take one (`load_case`, ...)."""
        images = {m: (None if p is None else str(p)) for m, p in self.images(modalities).items()}
        label = None if self.label is None else str(self.label)
        return Case(self.case_id, images, label, self.dataset, missing=[m for m, p in images.items() if p is None],
                    label_values=self.label_values)  # fmt: skip


def _from_dataset(root: Path, split: str, flag: str) -> list[InputCase]:
    """The cases of images<split> of an nnU-Net dataset folder that have at least one image file."""
    if not (root / f"images{split}").is_dir():
        other = SPLITS[1 - SPLITS.index(split)]
        extra = f"; pass --split {other} for images{other}" if (root / f"images{other}").is_dir() else ""
        raise InputError(f"{flag} {root}: the dataset has no images{split} folder{extra}.")
    ds = load_dataset_json(root)
    channel_names = dict(sorted((int(k), canonical_modality(v)) for k, v in ds["channel_names"].items()))
    found = []
    for case in list_cases(root, split=split):
        files = {i: Path(case.images[m]) for i, m in channel_names.items() if case.images[m] is not None}
        if files:
            label = None if case.label is None else Path(case.label)
            found.append(InputCase(case.case_id, files, channel_names, label, root.name,
                                   declared_label_values(ds["labels"])))  # fmt: skip
    return found


def _from_files(paths, where: str) -> list[InputCase]:
    """Group NIfTI files into cases by their `_XXXX` channel suffix (a file without one is channel 0)."""
    grouped: dict[str, dict[int, Path]] = {}
    for path in paths:
        case_id, channel = split_channel(nifti_stem(path.name))
        files = grouped.setdefault(case_id, {})
        if channel in files:
            raise InputError(f"{path} and {files[channel]} are both channel {channel} of case {case_id} in {where}.")
        files[channel] = path
    return [InputCase(c, dict(sorted(f.items())), dataset=where) for c, f in sorted(grouped.items())]


def resolve_inputs(path, split: str = "Ts", cases=None, flag: str = "--input") -> list[InputCase]:
    """The cases to predict, sorted by case id, from a NIfTI file, a folder of them, or an nnU-Net dataset folder.

    Args:
        path: a `.nii`/`.nii.gz` file; a folder of them (`CASE_XXXX` files are grouped by case, channel XXXX; a
            file without the suffix is a case of one channel); or a dataset folder (with dataset.json), whose
            images<split> are read as `shared.dataset.list_cases` does.
        split: "Tr" or "Ts", for a dataset folder.
        cases: only these case ids; an id that is not there is refused.
        flag: the flag that named `path`, for messages.
    Returns:
        list of InputCase, at least one.
    """
    root = Path(path)
    if split not in SPLITS:
        raise InputError(f"--split {split!r} must be Tr or Ts.")
    if root.is_file():
        if nifti_stem(root.name) is None:
            raise InputError(f"{flag} {root} is not a NIfTI file (.nii or .nii.gz).")
        found, where = _from_files([root], root.parent.name), str(root)
    elif (root / "dataset.json").is_file():
        found, where = _from_dataset(root, split, flag), str(root / f"images{split}")
    elif root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file() and nifti_stem(p.name) is not None)
        found, where = _from_files(files, root.name), str(root)
    else:
        raise InputError(f"{flag} {root} does not exist.")
    if not found:
        raise InputError(f"{flag} {root}: no NIfTI image (.nii or .nii.gz) found in {where}.")
    if cases:
        unknown = set(cases) - {c.case_id for c in found}
        if unknown:
            raise InputError(f"--cases {short_list(unknown)}: not among the {len(found)} case(s) of {where}.")
        found = [c for c in found if c.case_id in set(cases)]
    return found


def add_input_args(parser) -> None:
    """Add --input, --split, --cases and --output, the input convention of every predict CLI."""
    parser.add_argument("--input", required=True, help="a NIfTI file, a folder of NIfTI files (CASE_XXXX channel "
                        "files are grouped by case) or an nnU-Net dataset folder")  # fmt: skip
    parser.add_argument("--split", choices=SPLITS, default="Ts", help="imagesTr or imagesTs of a dataset --input")
    parser.add_argument("--cases", nargs="+", metavar="CASE", help="only these case ids (default: every case)")
    parser.add_argument("--output", required=True, help="folder for the predictions, one CASE.nii.gz per case")


def inputs_from_args(args) -> list[InputCase]:
    """`resolve_inputs` of the flags of `add_input_args`, after checking --output; before any work."""
    output = check_output_dir(args.output, "--output")
    found = resolve_inputs(args.input, split=args.split, cases=args.cases)
    folders = {Path(args.input).resolve()} | {p.parent.resolve() for c in found for p in c.files.values()}
    if output.resolve() in folders:
        raise InputError(f"--output {output} is a folder of the input images; pick another folder.")
    return found


# ----------------------------------------------------------------------------- evaluate: the subset to score


def add_subset_args(parser) -> None:
    """Add --cases | --split FILE (with --fold, --subset): the subset convention of every evaluate CLI."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cases", nargs="+", metavar="CASE", help="score only these case ids")
    group.add_argument("--split", metavar="FILE", help="score the --subset cases of OUT/split.json of a training "
                       "run, or of fold --fold of nnU-Net's splits_final.json")  # fmt: skip
    parser.add_argument("--fold", type=non_negative_int, help="the fold of a splits_final.json given with --split")
    parser.add_argument("--subset", choices=("val", "train"), default="val", help="which cases of --split to score")


def selected_cases(cases=None, split=None, *, fold: int | None = None, subset: str = "val",
                   dataset: str | None = None) -> list[str] | None:  # fmt: skip
    """The case ids an evaluate CLI scores: --cases, the --subset of --split, or None for every case.

    Args:
        cases: --cases ids.
        split: --split file (`shared.splits.read_split`: a run's split.json, nnU-Net's splits_final.json with
            `fold`, a plain {"train", "val"} split).
        fold: --fold, for a splits_final.json.
        subset: "val" or "train".
        dataset: the dataset folder name whose split is wanted; needed when the split file holds several, and
            checked when given (a split of another dataset is refused).
    """
    if cases and split:
        raise InputError("give --cases or --split, not both.")
    if cases:
        return list(dict.fromkeys(cases))
    if split is None:
        if fold is not None:
            raise InputError("--fold selects a fold of --split FILE, which is not given.")
        return None
    parts = read_split(split, fold=fold, strict_fold=True)
    for name, entry in parts.items():  # the --subset of either list may be scored, so both must be there
        if "val" not in entry:
            where = f"--split {split}" + ("" if name is None else f" [{name}]")
            raise InputError(f'{where}: expected {{"train": [...], "val": [...]}}.')
    chosen = dataset_split(parts, dataset, where=f"--split {split}")
    if not chosen[subset]:
        raise InputError(f"--split {split} lists no {subset} case.")
    return list(chosen[subset])
