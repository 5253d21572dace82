"""Spatial steps of the batched training augmentation (see `shared.augment`): rotation and scaling as one
resampling of the read region, mirroring, and simulated low resolution.

Tensors: images (B, C, X, Y, Z) float32, labels (B, X, Y, Z) integer, on any device. The per-sample parameters
come from `shared.augment.sample_params`; only small per-sample quantities (3 x 3 matrices, label sets) are
computed on the CPU, every voxel-sized operation runs on the images' device.
"""

import torch
import torch.nn.functional as F

LABEL_PADDING = -1  # label outside the read region, as nnU-Net's loader and SpatialTransform pad; cleaned to 0
SCORE_SCALE = 1000.0  # interpolated label indicators are scaled by this, then rounded to float16 (see below)


def rotation_scaling_matrices(angles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rz @ Ry @ Rx @ diag(s, s, s) per sample, as batchgeneratorsv2's `create_affine_matrix_3d`.

    Args:
        angles: (N, 3) float64 radians; angle k turns the plane of the two other axes (Rx acts on axes 1, 2).
        scales: (N,) float64; a factor > 1 samples a larger region, so structures shrink.

    Returns:
        (N, 3, 3) float64 on the CPU, acting on column vectors of voxel offsets from the patch centre.
    """
    angles, scales = angles.cpu().double(), scales.cpu().double()
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def matrix(rows):  # rows of (N,) entries -> (N, 3, 3)
        return torch.stack([torch.stack(row, -1) for row in rows], -2)

    rx = matrix([[one, zero, zero], [zero, cos[:, 0], -sin[:, 0]], [zero, sin[:, 0], cos[:, 0]]])
    ry = matrix([[cos[:, 1], zero, sin[:, 1]], [zero, one, zero], [-sin[:, 1], zero, cos[:, 1]]])
    rz = matrix([[cos[:, 2], -sin[:, 2], zero], [sin[:, 2], cos[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx @ torch.diag_embed(scales[:, None].expand(-1, 3))


def sampling_grids(matrices: torch.Tensor, patch: tuple[int, ...], in_shape: tuple[int, ...], device) -> torch.Tensor:
    """`grid_sample` grids that map each patch voxel through its sample's matrix into the read region.

    The patch centre lands on the region's centre. Each grid coordinate is the same float32 sum, in the same
    order, as in batchgeneratorsv2's SpatialTransform (a centred coordinate mesh times the matrix, divided by
    half the region size), so the grid, and with it every tie between labels, is bit-identical on the CPU;
    the mesh is separable, so the product is formed from three 1D axes instead of a (x*y*z, 3) matmul.

    Args:
        matrices: (N, 3, 3) float64 from `rotation_scaling_matrices`.
        patch: (x, y, z) output size.
        in_shape: (X0, Y0, Z0) size of the read region.

    Returns:
        (N, x, y, z, 3) float32, last axis in grid_sample's (z, y, x) order, align_corners=False units.
    """
    ax, ay, az = (torch.linspace((1 - s) / 2, (s - 1) / 2, s, device=device) for s in patch)
    ax, ay, az = ax.view(1, -1, 1, 1), ay.view(1, 1, -1, 1), az.view(1, 1, 1, -1)
    rows = matrices.float().to(device)[..., None, None, None]  # (N, 3, 3, 1, 1, 1)
    grids = torch.empty((len(matrices), *patch, 3), device=device)
    for i, size in enumerate(in_shape):
        grids[..., 2 - i] = (ax * rows[:, i, 0] + ay * rows[:, i, 1] + az * rows[:, i, 2]) / (size / 2)
    return grids


def centre_crop(volume: torch.Tensor, patch: tuple[int, ...], fill: float) -> torch.Tensor:
    """The central `patch` of the last three axes (start = size // 2 - patch // 2), padded with `fill` where the
    volume is smaller; what batchgeneratorsv2's SpatialTransform returns for a sample it does not rotate or
    scale. Always a new tensor."""
    starts = [s // 2 - p // 2 for s, p in zip(volume.shape[-3:], patch)]
    before = [max(-st, 0) for st in starts]
    after = [max(st + p - s, 0) for st, p, s in zip(starts, patch, volume.shape[-3:])]
    window = tuple(slice(max(st, 0), min(st + p, s)) for st, p, s in zip(starts, patch, volume.shape[-3:]))
    cropped = volume[(..., *window)]
    if not any(before) and not any(after):
        return cropped.clone()
    pad = [w for b, a in zip(reversed(before), reversed(after)) for w in (b, a)]
    return F.pad(cropped, pad, value=fill)


def rotate_and_scale(
    image: torch.Tensor, label: torch.Tensor | None, transform: torch.Tensor, matrices: torch.Tensor, patch: tuple
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """batchgeneratorsv2 SpatialTransform with nnU-Net's settings (no elastic deformation, centre of the read
    region, zeros padding for images, label padding -1, align_corners=False), for the whole batch.

    Samples with `transform` False are centre-cropped without interpolation, as in batchgeneratorsv2 (which
    puts them half a voxel away from an identity resampling when size - patch is odd). The others get their
    grids built together and their images resampled in one trilinear `grid_sample` call (nnU-Net v2 leaves
    BGv2's `mode_image='bilinear'`; nnU-Net v1 used cubic splines); labels follow per sample, see
    `resample_labels`.

    Args:
        image: (B, C, X0, Y0, Z0) float32 read region.
        label: (B, X0, Y0, Z0) integer, or None.
        transform: (B,) bool, samples to rotate/scale.
        matrices: (B, 3, 3) float64 from `rotation_scaling_matrices`.
        patch: (x, y, z) output size.

    Returns:
        image (B, C, x, y, z) float32 and label (B, x, y, z) of the input dtype (or None).
    """
    B = len(image)
    idx, keep = transform.cpu().nonzero().flatten(), (~transform.cpu()).nonzero().flatten()
    out_image = image.new_empty((B, image.shape[1], *patch))
    out_image[keep.to(image.device)] = centre_crop(image[keep.to(image.device)], patch, 0.0)
    out_label = None
    if label is not None:
        out_label = label.new_empty((B, *patch))
        out_label[keep.to(label.device)] = centre_crop(label[keep.to(label.device)], patch, LABEL_PADDING)
    if len(idx) == 0:
        return out_image, out_label
    sub = idx.to(image.device)
    grids = sampling_grids(matrices[idx], patch, tuple(image.shape[2:]), image.device)  # (N, x, y, z, 3)
    resampled = image if len(idx) == B else image[sub]  # a copy of the read regions only if needed
    out_image[sub] = F.grid_sample(resampled, grids, mode="bilinear", padding_mode="zeros", align_corners=False)
    if label is not None:
        for n, b in enumerate(idx.tolist()):
            out_label[b] = resample_labels(label[b], grids[n])
    return out_image, out_label


def resample_labels(lab: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """One sample's labels through its grid, as BGv2's `mode_seg='bilinear'` with its default
    `seg_tiebreak='nearest'`.

    Each label's indicator (x 1000) is interpolated trilinearly and rounded to float16, so that near-ties
    become exact ties, and the highest score wins; a tie goes to the nearest-neighbour label when that is one
    of the tied labels, else to the lowest tied label. As in BGv2: the candidates are the labels of the read
    region; the padding label -1 joins them only when the interpolation footprint reaches outside the region
    (it is then interpolated as 1000 + sample((indicator - 1) x 1000), the indicator padded with ones); with
    exactly two candidates, the higher one wins where its score passes 500.

    Args:
        lab: (X0, Y0, Z0) integer read region.
        grid: (x, y, z, 3) from `sampling_grids`.

    Returns:
        (x, y, z) of lab's dtype.
    """
    patch = grid.shape[:3]
    # BGv2's test: the kernel stays inside where every |grid coordinate| <= 1 - 1 / size (smallest axis)
    reach = max(-grid.min().item(), grid.max().item()) > min(1 - 1 / s for s in lab.shape)
    masks = _label_masks(lab, reach)
    values = list(masks)
    if len(values) == 1:
        return torch.full(patch, values[0], dtype=lab.dtype, device=lab.device)
    scored = values[-1:] if len(values) == 2 else values
    indicators = torch.empty((1, len(scored), *lab.shape), device=lab.device)
    for k, value in enumerate(scored):
        indicators[0, k].copy_(masks[value]).mul_(SCORE_SCALE)
    # only the padding label's indicator is 1 outside the region
    padded = scored.index(LABEL_PADDING) if reach and LABEL_PADDING in scored else None
    if padded is not None:
        indicators[0, padded] -= SCORE_SCALE
    scores = F.grid_sample(indicators, grid[None], mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    if padded is not None:
        scores[padded] += SCORE_SCALE
    # BGv2 compares float16 scores; rounding them to float16 and back gives the same comparisons in float32,
    # which CPUs compute much faster
    scores = scores.half().float()  # (len(scored), x, y, z)

    if len(values) == 2:
        out = torch.full(patch, values[0], dtype=lab.dtype, device=lab.device)
        out.masked_fill_(scores[0] > SCORE_SCALE / 2, values[1])
        ties = scores[0] == SCORE_SCALE / 2
        if ties.any():
            out[ties] = _nearest_labels(lab, grid[ties])
        return out
    best, winner = scores.max(0)  # the first maximum: the lowest label among tied ones
    candidates = torch.tensor(values, device=lab.device)
    out = candidates[winner].to(lab.dtype)
    ties = (scores == best).sum(0, dtype=torch.uint8) > 1  # (uint8: an int64 count is 5x slower here)
    if ties.any():
        nearest = _nearest_labels(lab, grid[ties])
        # the nearest label is always a candidate (outside the region it is the padding label, which then is
        # one); it settles the tie only if it is among the tied labels
        nearest_score = scores[:, ties].gather(0, torch.searchsorted(candidates, nearest.long())[None])[0]
        out[ties] = torch.where(nearest_score == best[ties], nearest, out[ties])
    return out


def _label_masks(lab: torch.Tensor, reach: bool) -> dict[int, torch.Tensor]:
    """{label: (X0, Y0, Z0) bool mask} for the labels of the read region, ascending, with the padding label
    when the footprint reaches outside (its mask marks the -1 voxels inside, maybe none)."""
    low, high = (int(v) for v in torch.aminmax(lab))
    # nnU-Net labels are consecutive integers, so one comparison per value beats sorting the whole volume;
    # torch.unique only for sparse label sets
    candidates = set(range(low, high + 1) if high - low < 64 else torch.unique(lab).tolist())
    masks = {}
    for value in sorted(candidates | ({LABEL_PADDING} if reach else set())):
        mask = lab == value
        if mask.any() or value == LABEL_PADDING:  # the padding label is a candidate by reaching outside
            masks[value] = mask
    return masks


def _nearest_labels(lab: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour labels at grid points (T, 3), the padding label outside the region: (T,) of lab's dtype.

    The voxel is picked as grid_sample(mode='nearest', align_corners=False) picks it, round half to even of
    ((g + 1) * size - 1) / 2 in float32 (the ties this settles sit exactly at half-voxel positions), but only
    the T points are looked up instead of resampling the whole label volume.
    """
    shape = torch.tensor(lab.shape, device=lab.device)
    sizes = shape.flip(0).to(points.dtype)  # grid coordinates come in (z, y, x) order
    voxel = torch.round(((points + 1) * sizes - 1) / 2).long().flip(-1)  # (T, 3) as (x, y, z)
    inside = ((voxel >= 0) & (voxel < shape)).all(-1)
    out = torch.full((len(points),), LABEL_PADDING, dtype=lab.dtype, device=lab.device)
    out[inside] = lab[tuple(voxel[inside].T)]
    return out


def mirror(
    image: torch.Tensor, label: torch.Tensor | None, flips: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """batchgeneratorsv2 MirrorTransform (and MONAI RandFlipd / torchio RandomFlip): flip spatial axis k of
    sample b where flips[b, k].

    Args:
        image: (B, C, X, Y, Z); label: (B, X, Y, Z) or None; flips: (B, 3) bool.
    """
    for b, row in enumerate(flips.cpu().tolist()):
        axes = [k for k in range(3) if row[k]]
        if axes:
            image[b] = image[b].flip([k + 1 for k in axes])
            if label is not None:
                label[b] = label[b].flip(axes)
    return image, label


def simulate_low_resolution(image: torch.Tensor, channels: torch.Tensor, zooms: torch.Tensor) -> torch.Tensor:
    """batchgeneratorsv2 SimulateLowResolutionTransform with nnU-Net's settings (one zoom for all axes of a
    channel): downsample to round(size * zoom) with 'nearest-exact', then back with trilinear interpolation.

    One `interpolate` pair per selected (sample, channel): each has its own low-resolution size, so they cannot
    share a call, and a batched gather formulation measured slower on the CPU.

    Args:
        image: (B, C, X, Y, Z) float32, modified in place.
        channels: (B, C) bool, the channels to degrade.
        zooms: (B, C) float64 in (0, 1].

    Returns:
        image.
    """
    for b, c in channels.cpu().nonzero().tolist():
        # BGv2 keeps the zooms in float32 and rounds size * zoom with Python's round; at least one voxel
        zoom = float(zooms[b, c].float())
        low = [max(round(size * zoom), 1) for size in image.shape[2:]]
        coarse = F.interpolate(image[b, c][None, None], low, mode="nearest-exact")
        image[b, c] = F.interpolate(coarse, image.shape[2:], mode="trilinear")[0, 0]
    return image
