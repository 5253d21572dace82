"""BrainSegFounder losses (Tang et al. Eq. 1-4, Dice) and SSL augmentations against hand-computed values.

Run: .venv/bin/python -m pytest -q tests/test_brainsegfounder_losses.py
"""

import math

import numpy as np
import pytest
import torch

from brainsegfounder import augment
from brainsegfounder.augment import cutout_boxes, inner_cutout, outer_cutout, rotate_views, two_views
from brainsegfounder.losses import contrastive_loss, dice_loss, inpainting_loss, rotation_loss, ssl_loss


def test_inpainting_l1():
    rec = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 2, 2)
    target = torch.tensor([1.5, 2.0, 1.0, 4.0]).view(1, 1, 1, 2, 2)
    assert math.isclose(inpainting_loss(rec, target).item(), (0.5 + 0 + 2 + 0) / 4)


def test_rotation_cross_entropy():
    logits = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0]])  # softmax of class 1: 3 / 6
    assert math.isclose(rotation_loss(logits, torch.tensor([1])).item(), math.log(2.0), rel_tol=1e-6)


def test_nt_xent_by_hand():
    # views v0=(1,0), v1=(0,1) | v2=(1,0), v3=(1,0); positives v0<->v2, v1<->v3; exp(cos/0.5) = e^2 or 1
    z_i = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # norms do not matter: cosine similarity
    z_j = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    e2 = math.exp(2.0)
    l0 = -math.log(e2 / (1 + e2 + e2))  # v0 vs v1 (0), v2 (1), v3 (1); positive v2
    l1 = -math.log(1 / (1 + 1 + 1))  # v1 vs v0, v2, v3, all orthogonal; positive v3
    l2 = -math.log(e2 / (e2 + 1 + e2))  # v2 vs v0 (1), v1 (0), v3 (1); positive v0
    l3 = -math.log(1 / (e2 + 1 + e2))  # v3 vs v0 (1), v1 (0), v2 (1); positive v1 (0)
    expected = (l0 + l1 + l2 + l3) / 4
    assert math.isclose(contrastive_loss(z_i, z_j, temperature=0.5).item(), expected, rel_tol=1e-6)


def test_total_ssl_loss_weights_each_part_by_hand():
    rot = torch.zeros(4, 4)  # uniform over the 4 classes: cross-entropy log 4
    labels = torch.tensor([0, 1, 2, 3])
    z_i, z_j = torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0]])  # as test_nt_xent
    rec = torch.zeros(4, 1, 1, 1, 2)
    target = torch.tensor([0.5, 0.0] * 4).view(4, 1, 1, 1, 2)  # L1 0.25
    e2 = math.exp(2.0)
    contrast = (-math.log(e2 / (1 + 2 * e2)) - math.log(1 / 3) - math.log(e2 / (2 * e2 + 1))
                - math.log(1 / (2 * e2 + 1))) / 4  # fmt: skip
    parts = ssl_loss(rot, labels, z_i, z_j, rec, target, weights=(2.0, 3.0, 5.0))
    assert math.isclose(parts["inpaint"].item(), 0.25, rel_tol=1e-6)
    assert math.isclose(parts["contrast"].item(), contrast, rel_tol=1e-6)
    assert math.isclose(parts["rotation"].item(), math.log(4.0), rel_tol=1e-6)
    # a1 inpainting, a2 contrastive, a3 rotation (Tang et al. Eq. 4)
    assert math.isclose(parts["loss"].item(), 2 * 0.25 + 3 * contrast + 5 * math.log(4.0), rel_tol=1e-6)
    unweighted = ssl_loss(rot, labels, z_i, z_j, rec, target)["loss"].item()
    assert math.isclose(unweighted, 0.25 + contrast + math.log(4.0), rel_tol=1e-6)  # the official 1, 1, 1


def test_dice_loss_by_hand():
    logits = torch.zeros(1, 1, 2, 2, 2)  # sigmoid 0.5 everywhere: sum p = 4
    target = torch.zeros(1, 1, 2, 2, 2)
    target[0, 0, 0, 0, :] = 1  # sum g = 2, intersection = 1
    expected = 1 - (2 * 1 + 1e-5) / (4 + 2 + 1e-5)
    assert math.isclose(dice_loss(logits, target).item(), expected, rel_tol=1e-6)


def test_dice_loss_matches_monai_with_batch_and_channels():
    losses = pytest.importorskip("monai.losses")
    torch.manual_seed(0)
    logits = torch.randn(3, 3, 4, 3, 2) * 2
    target = (torch.rand(3, 3, 4, 3, 2) < 0.4).float()
    target[1, 2] = 0  # an empty channel of one image
    ours = dice_loss(logits, target)
    theirs = losses.DiceLoss(sigmoid=True)(logits, target)  # per image and channel, then the mean
    assert torch.allclose(ours, theirs, atol=1e-6), (ours.item(), theirs.item())
    batch_dice = losses.DiceLoss(sigmoid=True, batch=True)(logits, target)  # sums over the batch first: not ours
    assert not torch.allclose(ours, batch_dice, atol=1e-4)


class ScriptedRng:
    """Returns scripted draws, to check the box logic by hand."""

    def __init__(self, uniform, integers):
        self._uniform, self._integers = list(uniform), list(integers)

    def uniform(self, low, high):
        return self._uniform.pop(0) * (high - low) + low

    def integers(self, low, high, size=None):
        value = self._integers.pop(0)
        assert low <= (value if size is None else min(value)) and (value if size is None else max(value)) < high
        return value if size is None else np.array(value)


def test_cutout_boxes_by_hand():
    # S = 20: sides drawn from [int(0.05 S), int(0.25 S)) = [1, 5), starts from [0, 20 - 1); target 0.01 * 8000 = 80
    rng = ScriptedRng(uniform=[0.01 / 0.3], integers=[3, 4, 5, 4, 4, 4, 18, 0, 0, 4, 2, 3, 0, 0, 0, 1, 1, 4])
    boxes = cutout_boxes((20, 20, 20), rng)
    # 4^3 = 64 < 80; the second box is clipped at the border: 2 x 2 x 3 = 12 -> 76 < 80; 1 x 1 x 4 -> 80 stops
    assert boxes == [((3, 7), (4, 8), (5, 9)), ((18, 20), (0, 2), (0, 3)), ((0, 1), (0, 1), (0, 4))]


def test_inner_and_outer_cutout():
    x = torch.full((2, 4, 4, 4), 5.0)
    box = [((1, 3), (0, 2), (2, 4))]
    inner = inner_cutout(x, box, np.random.default_rng(0))
    region = inner[:, 1:3, 0:2, 2:4]
    assert region.min() == 0 and region.max() == 1  # min-max scaled noise
    inner[:, 1:3, 0:2, 2:4] = 5.0
    assert torch.equal(inner, x) and x.max() == 5  # untouched elsewhere, input not modified
    source = torch.arange(128, dtype=torch.float32).view(2, 4, 4, 4)
    outer = outer_cutout(x, source, box)
    assert torch.equal(outer[:, 1:3, 0:2, 2:4], source[:, 1:3, 0:2, 2:4])
    assert (outer == 5).sum() == 128 - 16


def test_rotation_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 1, 2, 2).repeat(2, 1, 1, 1, 1)
    rotated, labels = rotate_views(x, ScriptedRng([], [[1, 2]]))
    assert labels.tolist() == [1, 2]
    assert rotated[0, 0, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]  # 90 degrees counter-clockwise
    assert rotated[1, 0, 0].tolist() == [[4.0, 3.0], [2.0, 1.0]]  # 180 degrees


def test_two_views_targets_are_the_rotated_crops():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 20, 20)
    views = two_views(x, np.random.default_rng(0))
    assert views["inputs"].shape == (4, 1, 8, 20, 20)
    for row, label in enumerate(views["labels"].tolist()):
        assert torch.equal(views["targets"][row], torch.rot90(x[row % 2], k=label, dims=(2, 3)))
    assert not torch.equal(views["inputs"], views["targets"])  # cutout changed something
    again = two_views(x, np.random.default_rng(0))  # noise included: the views are a function of the Generator
    assert all(torch.equal(views[k], again[k]) for k in views)


class RecordingRng:
    """Scripted partner draws, recording the range each integer draw asks for."""

    def __init__(self, partners):
        self.partners, self.calls = list(partners), []

    def integers(self, low, high):
        self.calls.append((low, high))
        return self.partners.pop(0)


def test_cutout_views_pastes_from_the_partly_augmented_batch(monkeypatch):
    """The official aug_rand loop, by hand: per sample, inner cutout, then a partner j ~ U{0..N-1} (so an outer
    cutout with probability (N-1)/N), pasting from sample j as it is at that moment."""
    boxes = [((0, 1), (0, 2), (0, 2)), ((3, 4), (0, 2), (0, 2))]  # the first and the last slice along D
    monkeypatch.setattr(augment, "cutout_boxes", lambda shape, rng: boxes)

    def inner(x, boxes, rng):  # marks the boxes of sample k (constant k elsewhere) with -(k + 1)
        x = x.clone()
        for (d0, d1), _, _ in boxes:
            x[:, d0:d1] = -(x[0, 1, 0, 0] + 1)
        return x

    monkeypatch.setattr(augment, "inner_cutout", inner)
    x = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1, 1).expand(3, 1, 4, 2, 2).clone()  # sample k = k
    rng = RecordingRng([2, 1, 0])  # sample 0 <- 2 (not yet augmented), 1 <- itself (no outer), 2 <- 0 (augmented)
    out = augment.cutout_views(x, rng)
    assert rng.calls == [(0, 3)] * 3  # the partner is uniform over all N samples, itself included
    along_d = out[:, 0, :, 0, 0].tolist()
    assert along_d[0] == [2, 0, 0, 2]  # inner -1 overwritten by sample 2's content
    assert along_d[1] == [-2, 1, 1, -2]  # partner = itself: inner cutout only
    assert along_d[2] == [2, 2, 2, 2]  # sample 0 after its cutouts (from the original batch: 0 ... 0)
    assert x[:, 0, :, 0, 0].tolist() == [[0] * 4, [1] * 4, [2] * 4]  # the input is not modified
