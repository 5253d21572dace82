"""Procedural brain anatomy and lesion shapes for the demo phantoms, in normalised coordinates.

Every length here is in normalised units: each array axis spans [-1, 1], so the anatomy scales with the
volume shape. A few sizes have a floor in voxels (`voxel`, the largest voxel edge in normalised units) so
that thin or small structures still exist on the small grids used by the tests.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# tissue codes of the anatomy map; they are also the label values of the anatomy dataset
BACKGROUND, CSF, GM, WM, DEEP_GM = 0, 1, 2, 3, 4


@dataclass
class Anatomy:
    """One case's healthy brain on a (D, H, W) grid.

    tissue: (D, H, W) uint8 tissue codes (BACKGROUND, CSF, GM, WM, DEEP_GM); outside the skull is BACKGROUND.
    depth: (D, H, W) float, approximate depth below the brain surface in normalised units (negative outside).
    ventricle_dist: (D, H, W) float, distance to the nearest ventricle voxel in normalised units.
    voxel: largest voxel edge in normalised units (2 / smallest axis length).
    """

    tissue: np.ndarray
    depth: np.ndarray
    ventricle_dist: np.ndarray
    voxel: float

    @property
    def parenchyma(self) -> np.ndarray:
        """Brain tissue that a lesion may replace: grey, white and deep grey matter."""
        return (self.tissue == GM) | (self.tissue == WM) | (self.tissue == DEEP_GM)


def grid(shape) -> tuple:
    """Normalised voxel-centre coordinates as an open grid: arrays of shape (D, 1, 1), (1, H, 1), (1, 1, W).

    Each axis spans (-1, 1). The open grid broadcasts to (D, H, W) and lets a lesion be computed in its
    bounding box only, by slicing each axis.
    """
    axes = [(np.arange(n) + 0.5) / n * 2.0 - 1.0 for n in shape]
    return tuple(a.reshape([-1 if i == j else 1 for j in range(3)]) for i, a in enumerate(axes))


def _rotate(rotation: np.ndarray, offset) -> list:
    """Apply a (3, 3) rotation to a vector field given as 3 broadcastable arrays."""
    return [rotation[i, 0] * offset[0] + rotation[i, 1] * offset[1] + rotation[i, 2] * offset[2] for i in range(3)]


def random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A (3, 3) rotation: three Euler angles drawn uniformly in [-max_degrees, max_degrees]."""
    a, b, c = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def smooth_field(coords, rng: np.random.Generator, n_waves: int, wavelength: tuple) -> np.ndarray:
    """A random smooth field with zero mean and unit variance: a sum of plane waves.

    Args:
        coords: 3 broadcastable arrays of normalised coordinates (an open grid or full (D, H, W) arrays).
        n_waves: number of plane waves; more waves look less regular.
        wavelength: (min, max) wavelength in normalised units, drawn uniformly per wave.

    Returns:
        (D, H, W) float field; each wave has variance 1/2, hence the sqrt(2 / n_waves) scale.
    """
    field = 0.0
    for _ in range(n_waves):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2.0 * np.pi / rng.uniform(*wavelength) * direction
        field = field + np.sin(k[0] * coords[0] + k[1] * coords[1] + k[2] * coords[2] + rng.uniform(0.0, 2.0 * np.pi))
    return field * np.sqrt(2.0 / n_waves)


def ellipsoid_radius(coords, centre, radii, rotation: np.ndarray) -> np.ndarray:
    """Ellipsoidal radius: 0 at `centre`, 1 on the surface of the rotated ellipsoid with semi-axes `radii`.

    Args:
        coords: 3 broadcastable arrays of normalised coordinates.
        centre, radii: 3 values each, normalised units.
        rotation: (3, 3) rotation from the volume frame into the ellipsoid's frame.
    """
    local = _rotate(rotation, [c - c0 for c, c0 in zip(coords, centre)])
    return np.sqrt(sum((x / r) ** 2 for x, r in zip(local, radii)))


def make_anatomy(coords, rng: np.random.Generator) -> Anatomy:
    """Draw one healthy brain: jittered ellipsoid, folded cortex, ventricles, deep grey nuclei, outer CSF.

    Array axes are read as (left-right, posterior-anterior, inferior-superior), matching a diagonal affine.
    """
    shape = np.broadcast_shapes(*(c.shape for c in coords))
    voxel = 2.0 / min(shape)
    # brain ellipsoid, longest front to back, with per-case size, position and pose
    radii = np.array([0.72, 0.80, 0.70]) * rng.uniform(0.95, 1.05, size=3)
    centre = rng.uniform(-0.03, 0.03, size=3)
    rotation = random_rotation(rng, max_degrees=8.0)
    r_brain = ellipsoid_radius(coords, centre, radii, rotation)
    depth = (1.0 - r_brain) * radii.mean()
    # the subarachnoid CSF between brain and skull; at least one voxel thick
    head = depth > -max(0.06, 1.2 * voxel)
    brain = depth > 0

    # brain-frame coordinates, so inner structures move and turn with the brain
    q = [x / r for x, r in zip(_rotate(rotation, [c - c0 for c, c0 in zip(coords, centre)]), radii)]

    # Folded cortex: sulci are the zero set of a random field of the direction from the brain centre, so they
    # are sheets running inward from the surface (like the spherical-harmonic folds of a gyrified brain).
    # The distance to a sheet is approximated by |f| / |grad f|. Grey matter lines the surface and both
    # banks of every sulcus; the white matter between the banks forms the gyral cores.
    norm = np.sqrt(sum(x**2 for x in q)) + 1e-6
    folds = smooth_field([x / norm for x in q], rng, n_waves=8, wavelength=(0.8, 1.2))
    gradient = np.gradient(folds, *[2.0 / n for n in shape])
    sheet_dist = np.abs(folds) / (np.sqrt(sum(g**2 for g in gradient)) + 1e-6)
    thickness = max(0.07, 1.6 * voxel)
    cleft = max(0.025, 0.5 * voxel)
    sulcal_depth = rng.uniform(0.16, 0.24)
    cortex = brain & ((depth < thickness) | ((sheet_dist < cleft + thickness) & (depth < sulcal_depth + thickness)))
    sulci = brain & (sheet_dist < cleft) & (depth < sulcal_depth)

    ventricles = np.zeros(shape, dtype=bool)
    deep_gm = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        v_centre = [side * 0.17, 0.05, 0.16] + rng.uniform(-0.02, 0.02, size=3)
        v_radii = np.array([0.10, 0.36, 0.15]) * rng.uniform(0.85, 1.15, size=3)
        ventricles |= ellipsoid_radius(q, v_centre, v_radii, random_rotation(rng, 6.0)) < 1.0
        d_centre = [side * 0.32, -0.02, -0.15] + rng.uniform(-0.02, 0.02, size=3)
        d_radii = np.array([0.18, 0.30, 0.20]) * rng.uniform(0.9, 1.1, size=3)
        deep_gm |= ellipsoid_radius(q, d_centre, d_radii, random_rotation(rng, 10.0)) < 1.0

    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[head] = CSF
    tissue[brain] = WM
    tissue[cortex] = GM
    tissue[sulci] = CSF
    tissue[brain & deep_gm] = DEEP_GM
    tissue[brain & ventricles] = CSF
    spacing = [2.0 / n for n in shape]
    ventricle_dist = ndimage.distance_transform_edt(~(brain & ventricles), sampling=spacing)
    return Anatomy(tissue=tissue, depth=depth, ventricle_dist=ventricle_dist, voxel=voxel)


def _pick_centre(rng: np.random.Generator, coords, allowed: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Coordinates (3,) of a random voxel of `allowed`; if none is allowed, of the voxel with the highest `score`.

    The fallback keeps tiny grids working; callers give excluded voxels a score of -inf.
    """
    candidates = np.flatnonzero(allowed)
    index = rng.choice(candidates) if candidates.size else int(np.argmax(score))
    voxel = np.unravel_index(index, allowed.shape)
    return np.array([c.ravel()[v] for c, v in zip(coords, voxel)])


def _blob(coords, rng, centre, radius: float, elongation: float, wobble: float, reach: float = 1.0) -> np.ndarray:
    """Radius field of an irregular ovoid: below 1 inside; `wobble` is the relative bumpiness of its surface.

    The field is computed only in the box that holds its level set `reach` and is +inf elsewhere, which
    makes a small lesion cost a small box rather than the whole volume.
    """
    radii = radius * np.array([1.0, 1.0, elongation]) * rng.uniform(0.85, 1.15, size=3)
    rotation = random_rotation(rng, 90.0)
    extent = reach * radii.max() / (1.0 - wobble)
    box = []
    for c, c0 in zip(coords, centre):
        inside = np.flatnonzero(np.abs(c.ravel() - c0) <= extent)
        box.append(slice(inside[0], inside[-1] + 1))
    # each open-grid axis array is sliced along its own axis only
    local = [c[tuple(box[i] if j == i else slice(None) for j in range(3))] for i, c in enumerate(coords)]
    bumps = smooth_field(local, rng, n_waves=4, wavelength=(3.0 * radius, 6.0 * radius))
    field = np.full(np.broadcast_shapes(*(c.shape for c in coords)), np.inf)
    field[tuple(box)] = ellipsoid_radius(local, centre, radii, rotation) / (1.0 + wobble * np.tanh(bumps))
    return field


def tumour_lesions(coords, anat: Anatomy, rng: np.random.Generator) -> dict:
    """A glioma-like tumour: necrotic core, enhancing rim and surrounding edema (disjoint masks).

    Returns:
        {"necrosis", "enhancing", "edema"} -> (D, H, W) bool masks; the core and rim may replace any
        tissue inside the brain, the edema only grey and white matter.
    """
    # `radius` is the outer radius of the enhancing rim; the necrotic core fills its inner half
    radius = max(rng.uniform(0.13, 0.21), 3.0 * anat.voxel)
    inside = anat.tissue > BACKGROUND
    centre = _pick_centre(rng, coords, inside & (anat.depth > 1.2 * radius), anat.depth)
    r = _blob(coords, rng, centre, radius, elongation=rng.uniform(0.8, 1.3), wobble=0.15)
    edema_reach = rng.uniform(1.5, 2.0)
    r_edema = _blob(coords, rng, centre, radius, elongation=rng.uniform(0.8, 1.4), wobble=0.3, reach=edema_reach)
    brain = anat.depth > 0
    necrosis = (r < 0.55) & brain
    enhancing = (r >= 0.55) & (r < 1.0) & brain
    edema = (r_edema < edema_reach) & (r >= 1.0) & anat.parenchyma
    return {"necrosis": necrosis, "enhancing": enhancing, "edema": edema}


def wmh_lesions(coords, anat: Anatomy, rng: np.random.Generator) -> dict:
    """White-matter hyperintensities: caps beside the ventricles plus a few punctate deep lesions.

    Returns:
        {"wmh"} -> (D, H, W) bool mask inside white matter.
    """
    wm = anat.tissue == WM
    lesion = np.zeros(wm.shape, dtype=bool)
    near_ventricle = wm & (anat.ventricle_dist < max(0.06, 1.5 * anat.voxel))
    for _ in range(rng.integers(1, 5)):
        centre = _pick_centre(rng, coords, near_ventricle, np.where(wm, -anat.ventricle_dist, -np.inf))
        radius = max(rng.uniform(0.07, 0.13), 1.5 * anat.voxel)
        lesion |= _blob(coords, rng, centre, radius, elongation=0.6, wobble=0.3) < 1.0
    deep = wm & (anat.depth > 0.12)
    for _ in range(rng.integers(0, 7)):
        centre = _pick_centre(rng, coords, deep, np.where(wm, anat.depth, -np.inf))
        radius = max(rng.uniform(0.025, 0.05), 1.0 * anat.voxel)
        lesion |= _blob(coords, rng, centre, radius, elongation=1.0, wobble=0.2) < 1.0
    return {"wmh": lesion & wm}


def ms_lesions(coords, anat: Anatomy, rng: np.random.Generator) -> dict:
    """Multiple-sclerosis plaques: several small ovoids in white matter, most of them periventricular.

    Returns:
        {"ms_lesion"} -> (D, H, W) bool mask inside white matter.
    """
    wm = anat.tissue == WM
    lesion = np.zeros(wm.shape, dtype=bool)
    periventricular = wm & (anat.ventricle_dist < max(0.10, 2.0 * anat.voxel))
    deep = wm & (anat.depth > 0.1)
    for _ in range(rng.integers(3, 11)):
        allowed = periventricular if rng.uniform() < 0.6 else deep
        centre = _pick_centre(rng, coords, allowed, np.where(wm, anat.depth, -np.inf))
        radius = max(rng.uniform(0.03, 0.06), 1.2 * anat.voxel)
        lesion |= _blob(coords, rng, centre, radius, elongation=rng.uniform(1.3, 2.0), wobble=0.15) < 1.0
    return {"ms_lesion": lesion & wm}


def chronic_infarct(coords, anat: Anatomy, rng: np.random.Generator) -> dict:
    """One chronic cortical/subcortical infarct: a large irregular region reaching the cortex.

    Returns:
        {"chronic_infarct"} -> (D, H, W) bool mask inside grey and white matter.
    """
    radius = max(rng.uniform(0.12, 0.22), 2.0 * anat.voxel)
    allowed = anat.parenchyma & (anat.depth > 0.04) & (anat.depth < 0.5 * radius)
    centre = _pick_centre(rng, coords, allowed, anat.parenchyma.astype(float))
    r = _blob(coords, rng, centre, radius, elongation=rng.uniform(1.0, 1.6), wobble=0.3)
    return {"chronic_infarct": (r < 1.0) & anat.parenchyma}


def acute_infarcts(coords, anat: Anatomy, rng: np.random.Generator) -> dict:
    """One to three acute infarcts of varied size in grey and white matter.

    Returns:
        {"acute_infarct"} -> (D, H, W) bool mask inside grey and white matter.
    """
    lesion = np.zeros(anat.tissue.shape, dtype=bool)
    for _ in range(rng.integers(1, 4)):
        radius = max(rng.uniform(0.04, 0.15), 1.5 * anat.voxel)
        centre = _pick_centre(rng, coords, anat.parenchyma & (anat.depth > 0.03), anat.parenchyma.astype(float))
        lesion |= _blob(coords, rng, centre, radius, elongation=rng.uniform(1.0, 1.8), wobble=0.25) < 1.0
    return {"acute_infarct": lesion & anat.parenchyma}


# dataset kind -> lesion generator; the anatomy dataset has none
LESION_GENERATORS = {
    "tumour": tumour_lesions,
    "wmh": wmh_lesions,
    "ms": ms_lesions,
    "stroke_chronic": chronic_infarct,
    "stroke_acute": acute_infarcts,
}
