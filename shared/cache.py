"""The preprocessed cache: each case of a raw nnU-Net dataset read, validated and preprocessed once, then memory-mapped.

A method declares its `Preprocessing` (channels, grid, intensity, labels). `build_cache` writes, per case,

    <cache>/<DatasetName>/<key>/<split>/<case>.npy         image (C, X, Y, Z) float32, uncompressed
    <cache>/<DatasetName>/<key>/<split>/<case>_seg.npy     label (X, Y, Z) uint8 / int16 (absent if unlabelled)
    <cache>/<DatasetName>/<key>/<split>/<case>_fg.npy      foreground coordinates (N, 3) int32, grouped by class
    <cache>/<DatasetName>/<key>/<split>/<case>.json        properties: sources, grids, classes, file sizes

where <key> hashes the preprocessing parameters and the dataset.json, so every run and package that asks for
the same parameters reuses the same files. Each case also records the size and mtime of its source files: a
case whose sources changed, or whose cached files have the wrong size or shape, is rebuilt, never read. The
properties file is written last, so a case without one (a killed build) is rebuilt from scratch; every file
is written atomically and builders hold a lock, so two processes starting at once do not corrupt the cache. A
build refused for bad input (`InputError`) removes the entries it wrote, and the folders it created.

The foreground coordinates are nnU-Net's "class locations": for each class a random subset of its voxels (all
of them up to 10,000, and at least 1 %), drawn with a fixed seed, from which foreground patches are centred
without scanning the label at every draw.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shared.atomic import atomic_path, remove_stale_temps
from shared.dataset import canonical_modality, list_cases, load_case, load_dataset_json
from shared.errors import InputError
from shared.geometry import resample_to_spacing, to_canonical
from shared.intensity import normalise_intensity

CACHE_VERSION = 1  # bump when the file layout or a preprocessing step changes meaning
FG_SAMPLES = 10_000  # nnU-Net: at most this many stored voxels per class ...
FG_MIN_FRACTION = 0.01  # ... but at least this fraction of the class's voxels
FG_SEED = 1234  # nnU-Net's fixed seed for the class-location subset
NORMALISATIONS = ("none", "zscore", "zscore_nonzero", "percentile", "ct")
LABEL_MODES = ("keep", "binary")
MISSING_MODES = ("refuse", "zero")


@dataclass(frozen=True)
class Preprocessing:
    """How a method turns a raw case into its training arrays. Every field enters the cache key.

    The steps run in this order: read and validate -> clip -> normalise -> reorient -> resample.
    """

    modalities: tuple | None = None  # channels to store, in this order (canonical names); None: every channel
    missing: str = "refuse"  # a channel file that is absent: "refuse" (one sentence) or "zero" (a zero channel)
    clip: tuple | None = None  # (low, high) intensity clip before normalisation, e.g. CT (-1000, 1000)
    normalise: str = "none"  # none | zscore (whole volume) | zscore_nonzero (inside any-channel > 0) | percentile | ct
    reorient: bool = False  # permute/flip the voxel axes to RAS (no interpolation)
    spacing: tuple | None = None  # target voxel size in mm; None keeps the native grid
    image_order: int = 1  # spline order of image resampling (labels are always nearest)
    labels: str = "keep"  # "keep" the label values or "binary" (label > 0 -> 1)

    def __post_init__(self):
        if self.normalise not in NORMALISATIONS:
            raise InputError(f"normalise must be one of {', '.join(NORMALISATIONS)}, got {self.normalise!r}.")
        if self.labels not in LABEL_MODES:
            raise InputError(f"labels must be one of {', '.join(LABEL_MODES)}, got {self.labels!r}.")
        if self.missing not in MISSING_MODES:
            raise InputError(f"missing must be one of {', '.join(MISSING_MODES)}, got {self.missing!r}.")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise InputError(f"spacing must be three positive values in mm, got {self.spacing}.")
        if self.clip is not None and (len(self.clip) != 2 or self.clip[0] >= self.clip[1]):
            raise InputError(f"clip must be (low, high) with low < high, got {self.clip}.")
        if self.modalities is not None:
            names = [canonical_modality(m) for m in self.modalities]
            if len(set(names)) != len(names) or not names:
                raise InputError(f"modalities must name each channel once, got {list(self.modalities)}.")
            object.__setattr__(self, "modalities", tuple(names))

    def key(self, dataset_json: dict, root) -> str:
        """12 hex digits of SHA-256 over the parameters, the dataset.json, the dataset's absolute path (two
        datasets of the same folder name never share files) and the cache version."""
        blob = json.dumps({"v": CACHE_VERSION, "prep": asdict(self), "dataset": dataset_json,
                           "root": str(Path(root).resolve())}, sort_keys=True)  # fmt: skip
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class CachedCase:
    """One preprocessed case: where its arrays are, and what a sampler needs without opening them."""

    case_id: str
    dataset: str  # dataset folder name
    image: str  # (C, X, Y, Z) float32 .npy
    label: str | None  # (X, Y, Z) .npy, None when the case has no label file
    foreground: str | None  # (N, 3) int32 .npy of class locations, None when unlabelled
    shape: tuple  # (X, Y, Z) of the cached grid
    channels: tuple  # modality of each image channel
    available: tuple  # 1 where the channel's file exists, 0 for a zero-filled missing channel
    classes: dict = field(default_factory=dict)  # class value -> {"start", "stop", "voxels", "bbox"}
    spacing: tuple = (1.0, 1.0, 1.0)  # voxel size of the cached grid, mm

    def open_image(self) -> np.ndarray:
        """The image as a read-only memory map (C, X, Y, Z)."""
        return np.load(self.image, mmap_mode="r")

    def open_label(self) -> np.ndarray:
        """The label as a read-only memory map (X, Y, Z); InputError when the case has none."""
        if self.label is None:
            raise InputError(f"case {self.case_id} of {self.dataset} has no label file.")
        return np.load(self.label, mmap_mode="r")

    def properties(self) -> dict:
        """Everything `preprocess_case` recorded: native shape, spacing and affine, orientation, sources, classes."""
        return json.loads(Path(self.image).with_suffix(".json").read_text())

    def class_locations(self, value: int) -> np.ndarray:
        """The stored voxels (n, 3) of class `value` (empty when the class is absent)."""
        info = self.classes.get(int(value))
        if info is None or self.foreground is None:
            return np.zeros((0, 3), dtype=np.int32)
        return np.load(self.foreground, mmap_mode="r")[info["start"] : info["stop"]]


def default_cache_root() -> Path:
    """`$BRAINSEG_CACHE`, else `data/cache` in the checkout (beside the demo data in `data/demo`)."""
    env = os.environ.get("BRAINSEG_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data" / "cache"


def cache_folder(root, prep: Preprocessing, cache_root=None) -> Path:
    """The folder of one dataset's cache for `prep`: <cache_root>/<DatasetName>/<key>."""
    root = Path(root)
    ds = load_dataset_json(root)
    return Path(cache_root or default_cache_root()) / root.name / prep.key(ds, root)


# ----------------------------------------------------------------------------- preprocessing one case


def _source_files(case) -> list:
    return [p for p in (*case.images.values(), case.label) if p is not None]


def source_signature(case) -> list:
    """[name, size, mtime_ns] of every source file of a case: a change in any of them rebuilds the case."""
    out = []
    for path in _source_files(case):
        st = os.stat(path)
        out.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
    return out


def _channels(case, prep: Preprocessing) -> list:
    if prep.modalities is None:
        return list(case.images)
    unknown = [m for m in prep.modalities if m not in case.images]
    if unknown:
        raise InputError(
            f"{case.dataset}: modalities {unknown} are not channels of this dataset (channels: {list(case.images)})."
        )
    return list(prep.modalities)


def preprocess_case(case, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Read, validate and preprocess one case.

    Returns:
        image (C, X, Y, Z) float32 in the cache grid, label (X, Y, Z) integer or None, and the properties
        needed to go back to the native grid (shapes, spacings, affine, orientation) and to sample from it.
    """
    channels = _channels(case, prep)
    present = [m for m in channels if case.images[m] is not None]
    absent = [m for m in channels if case.images[m] is None]
    if absent and prep.missing == "refuse":
        raise InputError(f"case {case.case_id} of {case.dataset}: no image file for channel(s) {absent}.")
    if not present:
        raise InputError(f"case {case.case_id} of {case.dataset}: no image file for any of the channels {channels}.")
    loaded, label, ref, names = load_case(case, modalities=present)
    if prep.clip is not None:
        loaded = np.clip(loaded, *prep.clip)
    loaded = normalise_intensity(loaded, prep.normalise)
    image = np.zeros((len(channels), *loaded.shape[1:]), dtype=np.float32)
    for c, name in enumerate(names):
        image[channels.index(name)] = loaded[c]
    if label is not None and prep.labels == "binary":
        label = (label > 0).astype(np.uint8)

    props = {
        "native_shape": list(image.shape[1:]),
        "native_spacing": list(ref.spacing),
        "native_affine": np.asarray(ref.affine).tolist(),
    }
    affine, spacing = np.asarray(ref.affine), ref.spacing
    if prep.reorient:
        image, affine, info = to_canonical(image, affine)
        if label is not None:
            label = to_canonical(label, ref.affine)[0]
        props["orientation"] = np.asarray(info.transform).tolist()
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    props["oriented_shape"] = list(image.shape[1:])
    if prep.spacing is not None:
        image = resample_to_spacing(image, spacing, prep.spacing, order=prep.image_order).astype(np.float32)
        if label is not None:
            label = resample_to_spacing(label, spacing, prep.spacing, order=0)
        spacing = tuple(n * s / m for n, s, m in zip(props["oriented_shape"], spacing, image.shape[1:]))
    props["shape"] = list(image.shape[1:])
    props["spacing"] = [float(s) for s in spacing]
    props["channels"] = channels
    props["available"] = [int(m in present) for m in channels]
    if label is not None:
        dtype = np.uint8 if int(label.max(initial=0)) <= 255 and int(label.min(initial=0)) >= 0 else np.int16
        label = label.astype(dtype)
    return np.ascontiguousarray(image, dtype=np.float32), label, props


def foreground_locations(label: np.ndarray, seed: int = FG_SEED) -> tuple[np.ndarray, dict]:
    """nnU-Net's class locations: per class > 0, min(10,000, n) of its n voxels (at least 1 % of n), at random.

    Args:
        label: (X, Y, Z) integer array.
    Returns:
        coordinates (N, 3) int32 grouped by class in increasing order, and for each class
        {"start", "stop"} (its rows), "voxels" (its full voxel count) and "bbox" ([min xyz, max xyz]).
    """
    rng = np.random.default_rng(seed)
    flat = np.flatnonzero(label > 0)
    values = label.reshape(-1)[flat]
    chunks, classes, start = [], {}, 0
    for value in np.unique(values):
        idx = flat[values == value]
        keep = max(min(FG_SAMPLES, idx.size), int(np.ceil(idx.size * FG_MIN_FRACTION)))
        picked = np.sort(rng.choice(idx, size=keep, replace=False)) if keep < idx.size else idx
        coords = np.stack(np.unravel_index(picked, label.shape), axis=1).astype(np.int32)
        all_coords = np.unravel_index(idx, label.shape)
        bbox = [[int(a.min()) for a in all_coords], [int(a.max()) for a in all_coords]]
        classes[int(value)] = {"start": start, "stop": start + keep, "voxels": int(idx.size), "bbox": bbox}
        chunks.append(coords)
        start += keep
    coords = np.concatenate(chunks) if chunks else np.zeros((0, 3), dtype=np.int32)
    return coords, classes


# ----------------------------------------------------------------------------- writing and checking entries


def _paths(folder: Path, case_id: str) -> dict:
    return {
        "image": folder / f"{case_id}.npy",
        "label": folder / f"{case_id}_seg.npy",
        "foreground": folder / f"{case_id}_fg.npy",
        "properties": folder / f"{case_id}.json",
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _npy_header(path: Path) -> tuple | None:
    """(shape, dtype string) from a .npy header, or None when the file is not a readable .npy."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        return tuple(shape), dtype.str
    except (OSError, ValueError, SyntaxError):
        return None


def write_case(case, prep: Preprocessing, folder: Path) -> None:
    """Preprocess one case and write its arrays, then its properties (the completion mark), each atomically."""
    paths = _paths(folder, case.case_id)
    signature = source_signature(case)
    image, label, props = preprocess_case(case, prep)
    files = {"image": image}
    if label is not None:
        coords, classes = foreground_locations(label)
        files.update(label=label, foreground=coords)
        props["classes"] = {str(k): v for k, v in classes.items()}
    for name, array in files.items():
        _save_npy(paths[name], array)
    props.update(
        case_id=case.case_id,
        dataset=case.dataset,
        sources=signature,
        files={name: {"bytes": paths[name].stat().st_size, "shape": list(a.shape), "dtype": a.dtype.str}
               for name, a in files.items()},
    )  # fmt: skip
    with atomic_path(paths["properties"]) as tmp:
        tmp.write_text(json.dumps(props))


def read_entry(case, folder: Path) -> CachedCase | None:
    """The cached entry of `case` if it is complete and current, else None (it must be (re)built).

    Current means: properties readable, the same source files with the same size and mtime, and every array
    file present with the recorded byte size and .npy shape and dtype (a truncated or replaced file fails).
    """
    paths = _paths(folder, case.case_id)
    try:
        props = json.loads(paths["properties"].read_text())
    except (OSError, ValueError):
        return None
    if props.get("sources") != source_signature(case):
        return None
    for name, info in props.get("files", {}).items():
        path = paths[name]
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return None
        if _npy_header(path) != (tuple(info["shape"]), info["dtype"]):
            return None
    files = props.get("files", {})
    if "image" not in files or (case.label is not None) != ("label" in files):
        return None
    return CachedCase(
        case_id=case.case_id,
        dataset=case.dataset,
        image=str(paths["image"]),
        label=str(paths["label"]) if "label" in files else None,
        foreground=str(paths["foreground"]) if "foreground" in files else None,
        shape=tuple(props["shape"]),
        channels=tuple(props["channels"]),
        available=tuple(props["available"]),
        classes={int(k): v for k, v in props.get("classes", {}).items()},
        spacing=tuple(props["spacing"]),
    )


@contextlib.contextmanager
def _build_lock(folder: Path):
    """Exclusive lock of one cache folder for the time of a build (other builders wait; readers never do)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_new_files(folder: Path, cases, existed: set, created: Path | None) -> None:
    """Remove what a refused build wrote: the folder it created (with everything in it), else the files of `cases`
    that were not in `existed` and the temp files of killed workers."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for case in cases:
        for path in _paths(folder, case.case_id).values():
            if path not in existed:
                path.unlink(missing_ok=True)
    remove_stale_temps(folder, recursive=False)


def _build_one(task) -> str:
    case, prep, folder = task
    write_case(case, prep, folder)
    return case.case_id


def build_cache(
    root,
    prep: Preprocessing,
    *,
    case_ids=None,
    split: str = "Tr",
    labelled_only: bool = False,
    cache_root=None,
    processes: int = 1,
    progress: bool = True,
) -> list[CachedCase]:
    """Preprocess the missing or stale cases of one dataset into its cache, and return the entries.

    Args:
        root: the raw nnU-Net dataset folder.
        prep: the method's preprocessing.
        case_ids: the cases to use (None: every case of the split); an id that is not in the split is refused.
        split: "Tr" (imagesTr/labelsTr) or "Ts".
        labelled_only: leave out cases without a label file.
        cache_root: where caches live (default `default_cache_root()`).
        processes: worker processes that preprocess cases in parallel (1: in this process).
        progress: show a tqdm bar while building.
    Returns:
        list of `CachedCase` in case-id order.
    """
    root = Path(root)
    ds = load_dataset_json(root)
    folder = Path(cache_root or default_cache_root()) / root.name / prep.key(ds, root) / split
    cases = list_cases(root, split)
    if case_ids is not None:
        wanted = set(case_ids)
        unknown = sorted(wanted - {c.case_id for c in cases})
        if unknown:
            raise InputError(f"{root}: case id(s) {unknown[:5]} are not in images{split}/labels{split}.")
        cases = [c for c in cases if c.case_id in wanted]
    if labelled_only:
        cases = [c for c in cases if c.label is not None]
    entries = {c.case_id: read_entry(c, folder) for c in cases}
    missing = [c for c in cases if entries[c.case_id] is None]
    if missing:
        created = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)  # top-most new one
        with _build_lock(folder):
            remove_stale_temps(folder, recursive=False)  # a killed build's; no live builder owns them under the lock
            tasks = [(c, prep, folder) for c in missing if read_entry(c, folder) is None]  # others may have built some
            existed = {p for c, _, _ in tasks for p in _paths(folder, c.case_id).values() if p.exists()}
            bar = tqdm(total=len(tasks), desc=f"cache {root.name}", disable=not progress or not tasks or None)
            try:
                if processes > 1 and len(tasks) > 1:
                    with get_context("fork").Pool(min(processes, len(tasks))) as pool:
                        for _ in pool.imap_unordered(_build_one, tasks):
                            bar.update()
                else:
                    for task in tasks:
                        _build_one(task)
                        bar.update()
            except InputError:
                # a refused case leaves nothing behind: the entries of this build go, and any folder it created (an
                # interrupted build keeps its complete entries instead, and the next build continues from them)
                bar.close()
                _remove_new_files(folder, [c for c, _, _ in tasks], existed, created)
                raise
            bar.close()
        for case in missing:
            entries[case.case_id] = read_entry(case, folder)
            if entries[case.case_id] is None:
                raise InputError(f"{folder}: case {case.case_id} could not be cached (was a source file changed?).")
    params = folder.parent / "params.json"  # after the first complete case: a refused dataset leaves no cache
    if entries and not params.is_file():
        with atomic_path(params) as tmp:
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "preprocessing": asdict(prep), "dataset": ds,
                                       "root": str(root.resolve())}))  # fmt: skip
    return [entries[c.case_id] for c in cases]
