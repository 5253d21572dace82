"""Prompts on a whole volume: the model crop around the prompt, and more crops when the target is larger.

SAM-Med3D sees one `size`^3 crop (128^3 = 192 mm at 1.5 mm), cut around the prompt by torchio's rule
(`preprocess.crop_start`) and z-normalised after the crop. A target larger than the crop is never cut silently:
- a box: the box is tiled by crops overlapping by at least half a crop, each prompted with the part of the box
  inside it (training boxes of a target larger than the crop touch the crop border the same way);
- clicks simulated from a label (`predict --label`): the label's bounding box is tiled the same way, each crop
  getting its own clicks from the label inside it (the interactive protocol of `interaction.evaluate_points`);
- user clicks: the crop around the first click (every click must lie inside it), then, as the ECCV paper's
  inference (Sec. 4.3: "extended by sliding windows with 50% overlap where the patch edge has predictions"), one
  more crop shifted by half a crop across each crop face that the mask reaches while the image continues
  beyond it, prompted with one positive click at the most interior voxel predicted so far in that crop.
At most `max_crops` crops (27, the official sliding-window inference's count); a target needing more is
refused. Overlapping crops are blended by averaging their full-resolution logits; the mask is logit > 0
(sigmoid > 0.5). Arrays are (X, Y, Z) in the model grid (RAS at the model spacing); points are voxel indices.
"""

import itertools
from collections import deque

import numpy as np
import torch
from scipy import ndimage

from sam_med3d_moe.interaction import evaluate_points
from sam_med3d_moe.model import upsample
from sam_med3d_moe.predictor import Predictor
from sam_med3d_moe.preprocess import bounding_box, crop_start, znorm_positive
from shared.errors import InputError
from shared.sampling import read_region

MAX_CROPS = 27


def axis_starts(lo: int, hi: int, size: int) -> list[int]:
    """Crop starts along one axis that cover [lo, hi] (inclusive): the torchio-centred crop when it fits, else
    evenly spaced crops from lo to hi with neighbours overlapping by at least half a crop."""
    extent = hi - lo + 1
    if extent <= size:
        return [int(crop_start(lo, hi, size))]
    count = int(np.ceil((extent - size) / (size // 2))) + 1
    return [int(round(v)) for v in np.linspace(lo, hi - size + 1, count)]


def tile_starts(bbox_min, bbox_max, size: int) -> list[np.ndarray]:
    """Every crop start (3,) of the tiling of a bounding box: the product of `axis_starts` per axis."""
    axes = [axis_starts(int(lo), int(hi), size) for lo, hi in zip(bbox_min, bbox_max)]
    return [np.array(start) for start in itertools.product(*axes)]


class Blend:
    """Average of the full-resolution logits of overlapping crops over one volume."""

    def __init__(self, shape) -> None:
        self.sum = np.zeros(shape, dtype=np.float32)
        self.count = np.zeros(shape, dtype=np.int32)

    def add(self, start, logits: np.ndarray) -> None:
        """Add a crop's (S, S, S) logits at `start`; the parts outside the volume are dropped."""
        src, dst = [], []
        for s, n, size in zip(start, self.sum.shape, logits.shape):
            lo, hi = max(int(s), 0), min(int(s) + size, n)
            dst.append(slice(lo, hi))
            src.append(slice(lo - int(s), hi - int(s)))
        self.sum[tuple(dst)] += logits[tuple(src)]
        self.count[tuple(dst)] += 1

    def mask(self) -> np.ndarray:
        """(X, Y, Z) bool: mean logit > 0 where some crop covered the voxel."""
        return (self.count > 0) & (self.sum > 0)


def _crop_tensor(image: np.ndarray, start, size: int) -> torch.Tensor:
    """The z-normalised model input (1, 1, S, S, S) of the crop at `start`."""
    return torch.from_numpy(znorm_positive(read_region(image, start, (size,) * 3)))[None, None]


def _logits(low_res: torch.Tensor, predictor: Predictor) -> np.ndarray:
    return upsample(low_res, predictor.cfg)[0, 0].float().cpu().numpy()


def _check_count(count: int, max_crops: int, what: str) -> None:
    if count > max_crops:
        raise InputError(
            f"{what} needs {count} crops of {max_crops} allowed; raise --max-crops, or give a smaller prompt."
        )


def segment_box(predictor: Predictor, image: np.ndarray, bbox_min, bbox_max, max_crops: int = MAX_CROPS, routing=None):
    """Segment from a box (inclusive voxel corners inside the volume).

    Returns:
        mask (X, Y, Z) bool, and the crop starts used.
    """
    size = predictor.cfg.image_size
    starts = tile_starts(bbox_min, bbox_max, size)
    _check_count(len(starts), max_crops, "--box")
    blend = Blend(image.shape)
    zeros = torch.zeros(1, 1, *(predictor.cfg.low_res,) * 3, device=predictor.device)
    for start in starts:
        lo = np.clip(np.asarray(bbox_min) - start, 0, size - 1)
        hi = np.clip(np.asarray(bbox_max) - start, 0, size - 1)
        box = torch.tensor(np.concatenate([lo, hi]), dtype=torch.long, device=predictor.device)[None]
        emb = predictor.embed(_crop_tensor(image, start, size))
        blend.add(start, _logits(predictor.step(emb, boxes=box, masks=zeros, routing=routing), predictor))
    return blend.mask(), starts


def segment_label(
    predictor: Predictor,
    image: np.ndarray,
    gt: np.ndarray,
    num_clicks: int,
    rng: np.random.Generator,
    max_crops: int = MAX_CROPS,
    routing=None,
):
    """Segment with clicks simulated from a ground-truth mask (the old official protocol per crop; the result is
    the prediction after the last click).

    Returns:
        mask (X, Y, Z) bool, and the crop starts used.
    """
    size = predictor.cfg.image_size
    starts = tile_starts(*bounding_box(gt), size)
    _check_count(len(starts), max_crops, "--label")
    blend = Blend(image.shape)
    for start in starts:
        target = read_region(gt, start, (size,) * 3)
        if not target.any():  # a corner tile of a non-convex target
            continue
        emb = predictor.embed(_crop_tensor(image, start, size))
        target = torch.from_numpy(target.astype(np.float32))[None, None].to(predictor.device)
        _, logits = evaluate_points(predictor.stepper(emb, routing), target, rng, predictor.cfg, num_clicks)
        blend.add(start, logits[0, 0].float().cpu().numpy())
    return blend.mask(), starts


def reached_faces(mask: np.ndarray, start, shape) -> list[np.ndarray]:
    """Starts of the crops shifted by half a crop across each face of the crop at `start` that the (S, S, S)
    `mask` touches while the volume (`shape`) continues beyond that face."""
    size = mask.shape[0]
    out = []
    for axis in range(3):
        if mask.take(0, axis=axis).any() and start[axis] > 0:
            out.append(np.array(start) - size // 2 * np.eye(3, dtype=np.int64)[axis])
        if mask.take(size - 1, axis=axis).any() and start[axis] + size < shape[axis]:
            out.append(np.array(start) + size // 2 * np.eye(3, dtype=np.int64)[axis])
    return out


def interior_voxel(mask: np.ndarray) -> np.ndarray:
    """The voxel (3,) of a non-empty mask farthest from its background (the first one in C order on a tie)."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    return np.array(np.unravel_index(int(np.argmax(depth)), mask.shape))


def segment_clicks(
    predictor: Predictor,
    image: np.ndarray,
    clicks: list,
    names: list[str],
    max_crops: int = MAX_CROPS,
    routing=None,
):
    """Segment from user clicks, one decoder step per click with the previous low-res mask (the protocol the
    maintainers recommend), and extend across crop faces the mask reaches.

    Args:
        clicks: [(point (3,) voxel index in the model grid, label 1 positive / 0 negative)], first one positive.
        names: how each click was given (the flag and its input coordinates), for the error messages.
    Returns:
        mask (X, Y, Z) bool, and the crop starts used.
    """
    size, device = predictor.cfg.image_size, predictor.device
    first = np.round(clicks[0][0]).astype(np.int64)
    start = crop_start(first, first, size)
    for (point, _), name in zip(clicks, names):
        local = np.round(point).astype(np.int64) - start
        if (local < 0).any() or (local >= size).any():
            raise InputError(
                f"{name} lies outside the {size}^3 crop around the first click; give clicks of one target within "
                "half a crop of the first one."
            )
    blend = Blend(image.shape)
    emb = predictor.embed(_crop_tensor(image, start, size))
    low_res = torch.zeros(1, 1, *(predictor.cfg.low_res,) * 3, device=device)
    for point, label in clicks:
        coords = torch.tensor(np.round(point) - start, dtype=torch.long, device=device).reshape(1, 1, 3)
        labels = torch.tensor([[label]], device=device)
        low_res = predictor.step(emb, points=(coords, labels), masks=low_res, routing=routing)
    logits = _logits(low_res, predictor)
    blend.add(start, logits)
    starts, queue = [start], deque(reached_faces(logits > 0, start, image.shape))
    zeros = torch.zeros_like(low_res)
    while queue:
        start = queue.popleft()
        if any(np.array_equal(start, s) for s in starts):
            continue
        _check_count(len(starts) + 1, max_crops, f"the target of {names[0]}")
        known = read_region(blend.mask(), start, (size,) * 3)  # the mask so far inside the new crop (its overlap)
        if not known.any():  # the blend of overlapping crops voted the face voxels out again
            continue
        click = torch.tensor(interior_voxel(known), dtype=torch.long, device=device).reshape(1, 1, 3)
        emb = predictor.embed(_crop_tensor(image, start, size))
        ones = torch.ones(1, 1, dtype=torch.long, device=device)
        logits = _logits(predictor.step(emb, points=(click, ones), masks=zeros, routing=routing), predictor)
        blend.add(start, logits)
        starts.append(start)
        queue.extend(reached_faces(logits > 0, start, image.shape))
    return blend.mask(), starts
