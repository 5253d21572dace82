"""Demo data: procedural multi-modal brain phantoms with lesions, written as nnU-Net v2 raw datasets.

    python -m shared.phantom --out data/demo --cases 12 --shape 64 64 64 --seed 0 [--datasets tumour wmh ...]
    python -m shared.phantom --out data/demo --datasets tumour stroke_acute --scanner B

Six datasets mirror the papers' table (tumour T1/T1ce/T2/FLAIR, white-matter hyperintensities T1/FLAIR, MS
T1/T2/FLAIR, chronic stroke T1, acute stroke DWI) plus an anatomy dataset (T1/T2, four tissue labels) for the
promptable model. Shapes come from `shared.phantom_anatomy`; this file gives each modality its tissue contrast
(mean intensity per class, per-case jitter, smooth bias field, blur, noise) and writes the files.
A case depends only on (seed, dataset name, case index), so any subset of datasets gives the same cases.

`--scanner B` writes the same lesion types as new datasets from another "scanner" (other patients, other
contrast, a stronger bias field, more noise, thick slices resampled to the grid): the kind of unseen dataset
of the MoME paper's Table 2 (in-house tumour and WMH sets from other sites), not a new lesion type.
"""

import json
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from shared.atomic import atomic_path
from shared.cli import check_output_dir, make_parser, run_cli
from shared.dataset import write_dataset_json
from shared.errors import InputError
from shared.phantom_anatomy import LESION_GENERATORS, grid, make_anatomy, smooth_field


class PhantomSpec(NamedTuple):
    """One phantom dataset: its nnU-Net id and name, channels in order, and labels."""

    dataset_id: int
    name: str
    modalities: tuple  # channel order of the files CASE_0000, CASE_0001, ...
    labels: dict  # dataset.json labels, name -> value
    classes: tuple  # contrast class of label value 1, 2, ... (empty for the anatomy dataset)


DATASETS = {
    "tumour": PhantomSpec(
        dataset_id=901,
        name="PhantomTumour",
        modalities=("T1", "T1ce", "T2", "FLAIR"),
        labels={"background": 0, "necrosis": 1, "edema": 2, "enhancing": 3},
        classes=("necrosis", "edema", "enhancing"),
    ),
    "wmh": PhantomSpec(
        dataset_id=902,
        name="PhantomWMH",
        modalities=("T1", "FLAIR"),
        labels={"background": 0, "wmh": 1},
        classes=("wmh",),
    ),
    "ms": PhantomSpec(
        dataset_id=903,
        name="PhantomMS",
        modalities=("T1", "T2", "FLAIR"),
        labels={"background": 0, "lesion": 1},
        classes=("ms_lesion",),
    ),
    "stroke_chronic": PhantomSpec(
        dataset_id=904,
        name="PhantomStrokeChronic",
        modalities=("T1",),
        labels={"background": 0, "infarct": 1},
        classes=("chronic_infarct",),
    ),
    "stroke_acute": PhantomSpec(
        dataset_id=905,
        name="PhantomStrokeAcute",
        modalities=("DWI",),
        labels={"background": 0, "infarct": 1},
        classes=("acute_infarct",),
    ),
    # label values equal the tissue codes of shared.phantom_anatomy
    "anatomy": PhantomSpec(
        dataset_id=906,
        name="PhantomAnatomy",
        modalities=("T1", "T2"),
        labels={"background": 0, "csf": 1, "grey_matter": 2, "white_matter": 3, "deep_grey_matter": 4},
        classes=(),
    ),
}

# class codes of the class map: the first five are the tissue codes of shared.phantom_anatomy
CLASSES = (
    "background",
    "csf",
    "gm",
    "wm",
    "deep_gm",
    "necrosis",
    "enhancing",
    "edema",
    "wmh",
    "ms_lesion",
    "chronic_infarct",
    "acute_infarct",
)
# Mean intensity of each class (columns in CLASSES order) before the per-case gain. T1: WM > GM > CSF;
# T2: CSF > GM > WM; FLAIR: T2-like with suppressed CSF; T1ce: T1 plus a bright enhancing rim; DWI: flat
# tissue contrast with a bright acute infarct. Edema and most lesions are bright on T2/FLAIR and dark on T1.
# fmt: off
CONTRAST = {
    #         bg    csf   gm    wm    deep  necr  enh   edema wmh   ms    chron acute
    "T1":    (0.00, 0.25, 0.60, 0.85, 0.68, 0.22, 0.58, 0.62, 0.72, 0.45, 0.27, 0.62),
    "T1ce":  (0.00, 0.25, 0.60, 0.85, 0.68, 0.24, 1.35, 0.62, 0.72, 0.45, 0.27, 0.62),
    "T2":    (0.00, 1.00, 0.62, 0.45, 0.55, 0.95, 0.72, 0.85, 0.80, 0.90, 0.98, 0.75),
    "FLAIR": (0.00, 0.12, 0.60, 0.48, 0.55, 0.45, 0.75, 0.95, 0.90, 0.92, 0.18, 0.85),
    "DWI":   (0.00, 0.18, 0.45, 0.40, 0.45, 0.20, 0.55, 0.42, 0.42, 0.45, 0.15, 1.00),
}
# fmt: on
# T1ce is the T1 sequence after contrast injection: same session, so same gain, class jitter and bias field
SESSION_OF = {"T1ce": "T1"}
NOISE_SD = {"DWI": 0.035}  # relative to the gain; other modalities use DEFAULT_NOISE_SD
DEFAULT_NOISE_SD = 0.02
MIN_SHAPE = 16


class Scanner(NamedTuple):
    """How one "scanner" renders a case. Scanner A is the default of every dataset; the others are domain shifts."""

    suffix: str  # appended to the dataset and case names ("" for scanner A)
    id_offset: int  # added to the nnU-Net dataset id
    contrast_power: float  # class means m -> m ** power: other sequence timings compress (< 1) the tissue contrast
    bias_scale: float  # multiplies the log bias field: a stronger receive-coil inhomogeneity
    noise_scale: float  # multiplies the noise level
    slice_fraction: float  # slice thickness as a fraction of the last axis (0: thin slices, the grid itself)


SCANNERS = {
    "A": Scanner(suffix="", id_offset=0, contrast_power=1.0, bias_scale=1.0, noise_scale=1.0, slice_fraction=0.0),
    # thick axial slices: 0.06 of the axis is 2 voxels at 32^3, 4 at 64^3 (about 10 mm on a real head at 1 mm)
    "B": Scanner(
        suffix="ScannerB", id_offset=10, contrast_power=0.8, bias_scale=2.0, noise_scale=2.0, slice_fraction=0.06
    ),  # fmt: skip
}


def case_rng(seed: int, dataset: str, case_index: int) -> np.random.Generator:
    """The generator of one case; crc32 of the name (not Python's salted hash) keeps it stable across runs."""
    return np.random.default_rng([seed, zlib.crc32(dataset.encode()), case_index])


def dataset_folder_name(dataset: str, scanner: str = "A") -> str:
    """`DatasetNNN_Name` of a phantom dataset and scanner: ("tumour", "B") -> "Dataset911_PhantomTumourScannerB"."""
    spec, profile = DATASETS[dataset], SCANNERS[scanner]
    return f"Dataset{spec.dataset_id + profile.id_offset:03d}_{spec.name}{profile.suffix}"


def thick_slices(image: np.ndarray, thickness: int) -> np.ndarray:
    """A thick-slice acquisition resampled back to the grid, along the last (axial) axis.

    Slab j averages voxels [j*t, (j+1)*t) (the last, partial slab repeats the edge voxel); each voxel is then the
    linear interpolation between the slab centres j*t + (t-1)/2 (constant beyond the first and last centres).
    thickness 1 returns the image unchanged.
    """
    if thickness < 1:
        raise InputError(f"thickness must be at least 1 voxel, got {thickness}.")
    if thickness == 1:
        return image
    n = image.shape[-1]
    m = -(-n // thickness)  # number of slabs
    padded = np.pad(image, [(0, 0)] * (image.ndim - 1) + [(0, m * thickness - n)], mode="edge")
    slabs = padded.reshape(*image.shape[:-1], m, thickness).mean(axis=-1)
    position = np.clip((np.arange(n) - (thickness - 1) / 2) / thickness, 0, m - 1)  # in slab units
    low = np.floor(position).astype(int)
    high, t = np.minimum(low + 1, m - 1), position - low
    return (slabs[..., low] * (1 - t) + slabs[..., high] * t).astype(image.dtype)


def _session(rng: np.random.Generator, coords: np.ndarray, bias_scale: float = 1.0) -> dict:
    """Per-case scanner settings of one sequence: gain, class-mean jitter and a smooth multiplicative bias."""
    x = coords
    linear = rng.normal(0.0, 0.08, size=3)
    quadratic = rng.normal(0.0, 0.05, size=6)
    pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    # a second-order polynomial in the normalised coordinates: smooth over the whole head, about +-20 %
    log_bias = sum(a * x[i] for i, a in enumerate(linear)) + sum(c * x[i] * x[j] for c, (i, j) in zip(quadratic, pairs))
    if bias_scale != 1.0:
        log_bias = log_bias * bias_scale
    return {
        "gain": rng.uniform(600.0, 1400.0),
        "jitter": 1.0 + np.clip(rng.normal(0.0, 0.03, size=len(CLASSES)), -0.06, 0.06),
        "bias": np.exp(log_bias),
    }


def _render(modality: str, class_map: np.ndarray, texture: np.ndarray, session: dict, rng,
            scanner: Scanner = SCANNERS["A"]) -> np.ndarray:  # fmt: skip
    """One modality's image: class means -> blur (partial volume) -> bias -> [thick slices] -> noise, zero outside.

    Args:
        class_map: (D, H, W) uint8 codes into CLASSES.
        texture: (D, H, W) smooth multiplicative tissue heterogeneity near 1, shared by all modalities.
        scanner: contrast power, noise scale and slice thickness of the scanner (the bias is in `session`).

    Returns:
        (D, H, W) float32 image, non-negative, skull-stripped (exactly 0 in the background).
    """
    means = np.asarray(CONTRAST[modality])
    if scanner.contrast_power != 1.0:
        means = means**scanner.contrast_power
    image = (means * session["jitter"])[class_map] * texture
    image = ndimage.gaussian_filter(image, sigma=rng.uniform(0.5, 0.8))
    image = image * session["bias"]
    if scanner.slice_fraction > 0:
        image = thick_slices(image, max(1, round(scanner.slice_fraction * image.shape[-1])))
    noise_sd = NOISE_SD.get(modality, DEFAULT_NOISE_SD) * scanner.noise_scale
    image = image + rng.normal(0.0, noise_sd, size=image.shape)
    image = np.clip(image, 0.0, None) * (class_map > 0) * session["gain"]
    return image.astype(np.float32)


def generate_case(
    dataset: str, shape, rng_seed: int, case_index: int = 0, return_class_map: bool = False, scanner: str = "A"
) -> tuple:
    """Generate one phantom case.

    Args:
        dataset: a key of DATASETS.
        shape: (D, H, W) grid size; the anatomy is defined in normalised coordinates and scales with it.
        rng_seed: the run's seed; with `dataset` and `case_index` it fixes the case exactly.
        case_index: index of the case within the dataset.
        return_class_map: also return the (D, H, W) uint8 map of CLASSES codes that the images were drawn
            from (tissue and lesion classes), e.g. to measure contrasts per tissue.
        scanner: a key of SCANNERS; another scanner also means other patients (its own case generator).

    Returns:
        (images, label) or (images, label, class_map): images maps modality name -> (D, H, W) float32 in the
        dataset's channel order; label is (D, H, W) uint8 with the dataset's label values, each one present.
    """
    spec, profile = DATASETS[dataset], SCANNERS[scanner]
    rng = case_rng(rng_seed, dataset + profile.suffix, case_index)
    coords = grid(tuple(shape))
    # the generators guarantee a voxel per lesion on sane grids; redraw rather than emit an empty label
    for _ in range(20):
        anatomy = make_anatomy(coords, rng)
        lesions = LESION_GENERATORS[dataset](coords, anatomy, rng) if spec.classes else {}
        if all(mask.any() for mask in lesions.values()):
            break
    else:
        raise RuntimeError(f"phantom {dataset}: could not place every lesion class on a grid of shape {shape}.")

    class_map = anatomy.tissue.copy()
    label = anatomy.tissue.copy() if not spec.classes else np.zeros_like(anatomy.tissue)
    for value, name in enumerate(spec.classes, start=1):
        class_map[lesions[name]] = CLASSES.index(name)
        label[lesions[name]] = value
    texture = 1.0 + 0.03 * smooth_field(coords, rng, n_waves=6, wavelength=(0.15, 0.4))
    sessions, images = {}, {}
    for modality in spec.modalities:
        session = SESSION_OF.get(modality, modality)
        if session not in sessions:
            sessions[session] = _session(rng, coords, bias_scale=profile.bias_scale)
        images[modality] = _render(modality, class_map, texture, sessions[session], rng, scanner=profile)
    return (images, label, class_map) if return_class_map else (images, label)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI atomically (temp file + rename); nibabel's gzip has no time stamp, so bytes are stable."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _expected_files(root: Path, spec: PhantomSpec, cases: int, suffix: str = "") -> list:
    """Every image and label file of a complete dataset folder."""
    files = []
    for i in range(cases):
        case = f"{spec.name}{suffix}_{i:03d}"
        files += [root / "imagesTr" / f"{case}_{c:04d}.nii.gz" for c in range(len(spec.modalities))]
        files.append(root / "labelsTr" / f"{case}.nii.gz")
    return files


def _check_args(datasets, cases: int, shape, seed: int, spacing, scanner: str = "A") -> None:
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise InputError(f"--datasets: unknown dataset {unknown[0]!r}; choose from {', '.join(DATASETS)}.")
    if scanner not in SCANNERS:
        raise InputError(f"--scanner: unknown scanner {scanner!r}; choose from {', '.join(SCANNERS)}.")
    if cases < 1:
        raise InputError(f"--cases must be at least 1, got {cases}.")
    if len(shape) != 3 or min(shape) < MIN_SHAPE:
        raise InputError(f"--shape must be three sizes of at least {MIN_SHAPE} voxels, got {tuple(shape)}.")
    if seed < 0:
        raise InputError(f"--seed must be non-negative, got {seed}.")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"--spacing must be three positive voxel sizes in mm, got {tuple(spacing)}.")


def write_phantom_datasets(
    out, datasets=None, cases: int = 12, shape=(64, 64, 64), seed: int = 0, spacing=(1, 1, 1), scanner: str = "A"
):
    """Write phantom datasets as nnU-Net v2 raw folders `<out>/DatasetNNN_Name`.

    A folder whose dataset.json records the same settings and whose files are all present is skipped;
    dataset.json is written last, so an interrupted folder is regenerated. A folder made with other
    settings is refused (InputError) rather than overwritten. All folders are checked before any is written.

    Args:
        out: parent folder of the datasets.
        datasets: keys of DATASETS (default: all six).
        cases: number of training cases per dataset.
        shape: (D, H, W) grid of every case.
        seed: run seed; a case depends only on (seed, dataset, case index).
        spacing: voxel size in mm; the affine is diag(spacing) with the volume centred on the origin.
        scanner: a key of SCANNERS; "B" writes `DatasetNNN_<Name>ScannerB` (id + 10) with other patients.

    Returns:
        List of the dataset folders (Path), in the order of `datasets`.
    """
    datasets = list(DATASETS) if datasets is None else list(datasets)
    shape, spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
    _check_args(datasets, cases, shape, seed, spacing, scanner)
    suffix = SCANNERS[scanner].suffix
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)

    check_output_dir(out, "--out")
    todo = []
    for dataset in datasets:
        spec = DATASETS[dataset]
        root = check_output_dir(Path(out) / dataset_folder_name(dataset, scanner), "--out")
        json_path = root / "dataset.json"
        wanted = {"dataset": dataset, "seed": seed, "shape": list(shape), "spacing": list(spacing), "cases": cases}
        if scanner != "A":  # folders of scanner A written before this option existed stay valid
            wanted["scanner"] = scanner
        if json_path.is_file():
            try:
                found = json.loads(json_path.read_text()).get("phantom")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                found = "unreadable dataset.json"
            if found != wanted:
                raise InputError(
                    f"{root}: holds a dataset made with other settings ({found}); remove it or choose another --out."
                )
            if all(f.is_file() for f in _expected_files(root, spec, cases, suffix)):
                print(f"skipped {root}: already complete")
                continue
        todo.append((dataset, spec, root, wanted))

    for dataset, spec, root, wanted in todo:
        start = time.perf_counter()
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        (root / "dataset.json").unlink(missing_ok=True)  # completeness marker, rewritten at the end
        for i in tqdm(range(cases), desc=spec.name, leave=False):
            images, label = generate_case(dataset, shape, seed, case_index=i, scanner=scanner)
            case = f"{spec.name}{suffix}_{i:03d}"
            for channel, modality in enumerate(spec.modalities):
                _save(root / "imagesTr" / f"{case}_{channel:04d}.nii.gz", images[modality], affine)
            _save(root / "labelsTr" / f"{case}.nii.gz", label, affine)
        write_dataset_json(
            root,
            channel_names=spec.modalities,
            labels=spec.labels,
            num_training=cases,
            name=spec.name + suffix,
            description=f"procedural {dataset} phantom from shared.phantom"
            + (f", scanner {scanner}" if suffix else ""),
            phantom=wanted,  # the settings, so that a complete folder is recognised and another one refused
        )
        print(f"wrote {root}: {cases} cases of shape {shape} in {time.perf_counter() - start:.1f} s")
    return [Path(out) / dataset_folder_name(d, scanner) for d in datasets]


def main(argv=None) -> None:
    parser = make_parser(__doc__, prog="python -m shared.phantom")
    parser.add_argument("--out", required=True, help="folder to hold the DatasetNNN_Name dataset folders")
    parser.add_argument("--cases", type=int, default=12, help="training cases per dataset")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=[64, 64, 64], metavar=("D", "H", "W"), help="grid size of every case"
    )
    parser.add_argument("--seed", type=int, default=0, help="run seed; a case depends on (seed, dataset, case index)")
    parser.add_argument(
        "--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("SX", "SY", "SZ"), help="voxel size in mm"
    )
    parser.add_argument(
        "--datasets", nargs="+", default=list(DATASETS), help=f"datasets to write (default all: {' '.join(DATASETS)})"
    )
    parser.add_argument(
        "--scanner",
        default="A",
        help="A (default) or B: the same lesion types from another scanner (other patients and contrast, stronger "
        "bias field, twice the noise, thick slices), written as DatasetNNN_<Name>ScannerB with id + 10",
    )
    args = parser.parse_args(argv)
    write_phantom_datasets(
        args.out,
        datasets=args.datasets,
        cases=args.cases,
        shape=args.shape,
        seed=args.seed,
        spacing=args.spacing,
        scanner=args.scanner,
    )


if __name__ == "__main__":
    run_cli(main)
