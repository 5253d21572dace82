"""Prompt sets for `predict`: from the command line (one image) or from a JSON file (a folder of images).

A prompt set is what one mask is predicted from: clicks (`points` positive, then `negative`; one decoder step
per click, with the previous mask) or one `box`. Coordinates are voxel indices of the input image. The JSON
file maps case ids (as `shared.inputs.resolve_inputs` names the images: the file name without `_XXXX.nii.gz`)
to a list of prompt sets, each written to OUTPUT/<case>_<name>.nii.gz::

    {"BRATS_001": [{"name": "tumour", "points": [[40, 52, 31], [44, 50, 30]], "negative": [[60, 52, 31]]},
                   {"name": "ventricle", "box": [10, 20, 30, 50, 60, 70]}],
     "BRATS_002": [{"points": [[38, 49, 29]]}]}

`name` is optional (default "prompt1", "prompt2", ... in list order) and must be unique per case.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.cli import read_json_file
from shared.errors import InputError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class PromptSet:
    """One mask's prompts, in input voxel indices."""

    name: str
    points: tuple = ()  # positive clicks, each (i, j, k)
    negative: tuple = ()  # negative clicks, after the positive ones
    box: tuple | None = None  # (i0, j0, k0, i1, j1, k1), two opposite corners
    source: str = ""  # where it was given ("--point/--negative", "--prompts FILE [case][n]"), for messages

    def clicks(self) -> list[tuple[np.ndarray, int]]:
        """[(point (3,), label 1 / 0)] in the order they are applied."""
        return [(np.asarray(p, dtype=np.float64), 1) for p in self.points] + [
            (np.asarray(p, dtype=np.float64), 0) for p in self.negative
        ]

    def names(self) -> list[str]:
        """Each click (or the box) as the user gave it, e.g. "--point 40 52 31", for one-sentence errors."""

        def show(flag, values):
            return f"{flag} {' '.join(f'{v:g}' for v in values)}"

        if self.box is not None:
            return [show(f"{self.source} box" if self.source else "--box", self.box)]
        pos, neg = (f"{self.source} points", f"{self.source} negative") if self.source else ("--point", "--negative")
        return [show(pos, p) for p in self.points] + [show(neg, p) for p in self.negative]


def _numbers(value, count: int, where: str) -> tuple:
    ok = isinstance(value, list | tuple) and len(value) == count
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in value)
    if not ok:
        raise InputError(f"{where} must be a list of {count} numbers (voxel indices), got {json.dumps(value)}.")
    return tuple(float(v) for v in value)


def _point_list(value, where: str) -> tuple:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where} must be a non-empty list of [i, j, k] clicks, got {json.dumps(value)}.")
    return tuple(_numbers(p, 3, f"{where}[{n}]") for n, p in enumerate(value))


def make_prompt_set(entry: dict, default_name: str, where: str) -> PromptSet:
    """Check one JSON prompt set and build it (one sentence naming the entry on any error)."""
    if not isinstance(entry, dict):
        raise InputError(f"{where} must be an object with points/negative or box, got {json.dumps(entry)}.")
    unknown = sorted(set(entry) - {"name", "points", "negative", "box"})
    if unknown:
        raise InputError(f"{where} has unknown key(s) {unknown}; use name, points, negative or box.")
    name = entry.get("name", default_name)
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"{where} name {json.dumps(name)} must be letters, digits, '_', '-' or '.' (a file name).")
    has_points, has_box = "points" in entry, "box" in entry
    if has_points == has_box:
        raise InputError(
            f"{where} needs either points (with optional negative) or a box, not {'both' if has_box else 'neither'}."
        )
    if "negative" in entry and not has_points:
        raise InputError(f"{where}: negative clicks need positive points first.")
    if has_box:
        return PromptSet(name=name, box=_numbers(entry["box"], 6, f"{where} box"), source=where)
    points = _point_list(entry["points"], f"{where} points")
    negative = _point_list(entry["negative"], f"{where} negative") if "negative" in entry else ()
    return PromptSet(name=name, points=points, negative=negative, source=where)


def read_prompt_file(path) -> dict[str, list[PromptSet]]:
    """The prompt sets of a JSON file, by case id; every entry is checked before any work.

    Raises:
        InputError: unreadable JSON, a malformed entry, or a name used twice for one case.
    """
    path = Path(path)
    data = read_json_file(path, "--prompts", "JSON prompt file")
    if not isinstance(data, dict) or not data:
        raise InputError(f"--prompts {path}: expected {{case id: [prompt sets]}}, got {type(data).__name__}.")
    out = {}
    for case, entries in data.items():
        if not isinstance(entries, list) or not entries:
            raise InputError(f"--prompts {path} [{case}] must be a non-empty list of prompt sets.")
        sets = [make_prompt_set(e, f"prompt{n + 1}", f"--prompts {path} [{case}][{n}]") for n, e in enumerate(entries)]
        names = [s.name for s in sets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InputError(f"--prompts {path} [{case}] uses the name(s) {twice} more than once.")
        out[case] = sets
    return out


def prompt_set_from_flags(args) -> PromptSet:
    """The one prompt set of --point / --negative / --box (the single-image form of `predict`)."""
    if args.box is not None:
        return PromptSet(name="box", box=tuple(args.box))
    return PromptSet(
        name="points", points=tuple(map(tuple, args.point)), negative=tuple(map(tuple, args.negative or ()))
    )


def check_inside(prompt: PromptSet, shape) -> None:
    """Refuse clicks or box corners outside the image of `shape` (a click there gives an empty or full mask)."""
    top = np.array(shape[:3]) - 1
    if prompt.box is not None:
        corners, names = [prompt.box[:3], prompt.box[3:]], prompt.names() * 2
    else:
        corners, names = [*prompt.points, *prompt.negative], prompt.names()
    for point, name in zip(corners, names):
        if (np.asarray(point) < 0).any() or (np.asarray(point) > top).any():
            raise InputError(f"{name} lies outside the image (voxel indices 0 to {' '.join(map(str, top))}).")
