"""MoME Dice+CE, Eq. 2-4 vs hand-worked values. Run: .venv/bin/python -m pytest -q tests/test_mome_losses.py"""

import math

import pytest
import torch

from mome.losses import (
    curriculum_loss,
    curriculum_weight,
    deep_supervised_loss,
    deep_supervision_weights,
    dice_ce_loss,
    downsample_target,
    expert_specialisation_loss,
)

SMOOTH = 1e-5
LN3 = math.log(3.0)


def two_voxel_case():
    """Voxel a: logits (0, ln 3) -> p = (1/4, 3/4), label 1. Voxel b: logits (0, 0) -> p = (1/2, 1/2), label 0."""
    logits = torch.tensor([[0.0, 0.0], [LN3, 0.0]]).view(1, 2, 1, 1, 2)  # (B=1, K=2, 1, 1, 2 voxels)
    target = torch.tensor([1, 0]).view(1, 1, 1, 1, 2)
    return logits, target


def test_dice_ce_two_voxels_by_hand():
    logits, target = two_voxel_case()
    ce = (math.log(4 / 3) + math.log(2)) / 2
    # foreground: I = 3/4 * 1 + 1/2 * 0, sum gt = 1, sum pred = 3/4 + 1/2
    dc_fg = (2 * 0.75 + SMOOTH) / (1 + 1.25 + SMOOTH)
    assert dice_ce_loss(logits, target).item() == pytest.approx(ce - dc_fg, abs=1e-6)
    # with background: I = 1/4 * 0 + 1/2 * 1, sum gt = 1, sum pred = 1/4 + 1/2
    dc_bg = (2 * 0.5 + SMOOTH) / (1 + 0.75 + SMOOTH)
    assert dice_ce_loss(logits, target, do_bg=True).item() == pytest.approx(ce - (dc_bg + dc_fg) / 2, abs=1e-6)
    # the 4D label layout (B, D, H, W) is accepted as well
    assert dice_ce_loss(logits, target[:, 0]).item() == pytest.approx(ce - dc_fg, abs=1e-6)


def test_dice_ce_batch_dice_and_per_sample():
    logits1, target1 = two_voxel_case()
    logits2 = torch.zeros(1, 2, 1, 1, 2)  # p = 1/2 everywhere, no foreground in the label
    target2 = torch.zeros(1, 1, 1, 1, 2, dtype=torch.long)
    logits, target = torch.cat([logits1, logits2]), torch.cat([target1, target2])
    ce1 = (math.log(4 / 3) + math.log(2)) / 2
    ce2 = math.log(2)
    dc1 = (1.5 + SMOOTH) / (2.25 + SMOOTH)
    dc2 = SMOOTH / (1.0 + SMOOTH)  # empty label: only the smoothing term survives
    per_sample = dice_ce_loss(logits, target, reduction="none")
    assert per_sample.tolist() == pytest.approx([ce1 - dc1, ce2 - dc2], abs=1e-6)
    assert dice_ce_loss(logits, target).item() == pytest.approx((ce1 + ce2) / 2 - (dc1 + dc2) / 2, abs=1e-6)
    # batch Dice pools the sums: I = 3/4, sum gt = 1, sum pred = 5/4 + 1
    dc_batch = (1.5 + SMOOTH) / (1 + 2.25 + SMOOTH)
    batch = dice_ce_loss(logits, target, batch_dice=True)
    assert batch.item() == pytest.approx((ce1 + ce2) / 2 - dc_batch, abs=1e-6)


def test_deep_supervision_weights():
    assert deep_supervision_weights(5).tolist() == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])
    assert deep_supervision_weights(2).tolist() == pytest.approx([1.0, 0.0])
    assert deep_supervision_weights(1).tolist() == pytest.approx([1.0])


def test_downsample_target_nearest_exact():
    target = torch.randint(0, 3, (2, 1, 8, 8, 4))
    full, half, quarter = downsample_target(target, [(8, 8, 4), (4, 4, 2), (2, 2, 1)])
    assert torch.equal(full, target)
    # nearest-exact samples the voxel whose centre is nearest: source index floor((o + 0.5) * 2) = 2o + 1
    assert torch.equal(half, target[:, :, 1::2, 1::2, 1::2])
    assert torch.equal(quarter, target[:, :, 2::4, 2::4, 2::4])  # floor((o + 0.5) * 4) = 4o + 2
    assert half.dtype == torch.long


def test_deep_supervised_loss_eq4():
    torch.manual_seed(0)
    outs = [torch.randn(2, 2, 8, 8, 8), torch.randn(2, 2, 4, 4, 4), torch.full((2, 2, 2, 2, 2), float("nan"))]
    tgts = downsample_target(torch.randint(0, 2, (2, 1, 8, 8, 8)), [o.shape[2:] for o in outs])
    got = deep_supervised_loss(outs, tgts, deep_supervision_weights(3))
    # k = (2/3, 1/3, 0); the k = 0 level is skipped, so its NaN logits do not leak in
    expected = 2 / 3 * dice_ce_loss(outs[0], tgts[0]) + 1 / 3 * dice_ce_loss(outs[1], tgts[1])
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_curriculum_weight():
    assert curriculum_weight(0, 800) == 1.0
    assert curriculum_weight(200, 800) == pytest.approx(0.5625)
    assert curriculum_weight(400, 800) == pytest.approx(0.25)
    assert curriculum_weight(800, 800) == 0.0
    with pytest.raises(ValueError, match="epoch"):
        curriculum_weight(801, 800)


def mixed_batch(seed=0, n_experts=5, batch=3):
    torch.manual_seed(seed)
    experts = [
        [torch.randn(batch, 2, 8, 8, 8, requires_grad=True), torch.randn(batch, 2, 4, 4, 4, requires_grad=True)]
        for _ in range(n_experts)
    ]
    target = torch.randint(0, 2, (batch, 1, 8, 8, 8))
    return experts, target


def test_indicator_selects_each_samples_expert():
    experts, target = mixed_batch()
    modality = torch.tensor([2, 0, 2])
    targets = downsample_target(target, [(8, 8, 8), (4, 4, 4)])
    w = deep_supervision_weights(2)
    got = expert_specialisation_loss(experts, targets, modality, w)
    naive = 0.0
    for b, m in enumerate([2, 0, 2]):  # the official per-sample loop, summed over the batch
        one = [experts[m][0][b : b + 1], experts[m][1][b : b + 1]]
        naive = naive + deep_supervised_loss(one, [t[b : b + 1] for t in targets], w)
    assert got.item() == pytest.approx(naive.item(), abs=1e-6)
    mean = expert_specialisation_loss(experts, targets, modality, w, reduction="mean")
    assert mean.item() == pytest.approx(naive.item() / 3, abs=1e-6)
    got.backward()
    for i, levels in enumerate(experts):
        grad = levels[0].grad
        if i in (0, 2):
            assert grad is not None and grad.abs().sum() > 0
        else:
            assert grad is None
    # sample 1 belongs to expert 0: expert 2 gets no gradient from it
    assert experts[2][0].grad[1].abs().sum() == 0 and experts[0][0].grad[0].abs().sum() == 0
    with pytest.raises(ValueError, match="modality"):
        expert_specialisation_loss(experts, targets, torch.tensor([5, 0, 0]), w)


def test_curriculum_loss_eq2_and_ablation():
    experts, target = mixed_batch(seed=1)
    fused = [torch.randn(3, 2, 8, 8, 8), torch.randn(3, 2, 4, 4, 4)]
    modality = torch.tensor([4, 1, 1])
    targets = [target, target[:, :, 1::2, 1::2, 1::2]]
    w = torch.tensor([1.0, 0.0])  # two levels: only the finest counts
    l_mome = dice_ce_loss(fused[0], targets[0]).item()
    l_experts = sum(dice_ce_loss(experts[m][0][b : b + 1], target[b : b + 1]).item() for b, m in enumerate([4, 1, 1]))
    for epoch, f in [(0, 1.0), (50, 0.25), (100, 0.0)]:
        out = curriculum_loss(fused, experts, target, modality, epoch=epoch, num_epochs=100)
        assert out["loss"].item() == pytest.approx(f * l_experts + (1 - f) * l_mome, abs=1e-5)
        assert out["f_epoch"].item() == pytest.approx(f)
    # --no-curriculum: Eq. 4 alone at any epoch
    off = curriculum_loss(fused, experts, target, modality, epoch=0, num_epochs=100, curriculum=False)
    assert off["loss"].item() == pytest.approx(l_mome, abs=1e-6)
    assert deep_supervised_loss(fused, targets, w).item() == pytest.approx(l_mome, abs=1e-6)


def naive_dice_ce(logits, labels):
    """L of Eq. 3/4 for ONE sample, written out voxel by voxel: CE mean - mean over foreground classes of soft Dice.

    logits (K, d, h, w), labels (d, h, w) int.
    """
    k = logits.shape[0]
    p = torch.softmax(logits.double(), dim=0).reshape(k, -1)
    y = labels.reshape(-1)
    ce = sum(-math.log(p[y[v], v].item()) for v in range(y.numel())) / y.numel()
    dcs = []
    for c in range(1, k):
        inter = sum(p[c, v].item() for v in range(y.numel()) if y[v] == c)
        gt = sum(1 for v in range(y.numel()) if y[v] == c)
        pred = p[c].sum().item()
        dcs.append((2 * inter + SMOOTH) / (gt + pred + SMOOTH))
    return ce - sum(dcs) / len(dcs)


# four levels 4^3, 2^3, 1^3 (and a 1^3 coarsest): nnU-Net weights 1, 1/2, 1/4, 0 normalised -> 4/7, 2/7, 1/7, 0
DS4 = [4 / 7, 2 / 7, 1 / 7, 0.0]


def four_level_batch(seed, n_experts=3, batch=3, k=3):
    """Experts' (and fused) logits at 4 deep-supervision levels with 3 classes; full-resolution labels 4^3."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [4, 2, 1, 1]
    experts = [[torch.randn(batch, k, s, s, s, generator=gen) for s in sizes] for _ in range(n_experts)]
    fused = [torch.randn(batch, k, s, s, s, generator=gen) for s in sizes]
    target = torch.randint(0, k, (batch, 1, 4, 4, 4), generator=gen)
    # d^l(Y), nearest-exact: level 1 samples voxel 2o+1, level 2 (and 3) voxel 2 (floor((0 + 0.5) * 4))
    targets = [target, target[:, :, 1::2, 1::2, 1::2], target[:, :, 2:3, 2:3, 2:3], target[:, :, 2:3, 2:3, 2:3]]
    return experts, fused, target, targets


def naive_deep_supervised(levels, targets, b):
    """sum_l k_l L(sigma(levels[l][b]), d^l(Y)[b]) for one sample b (Eq. 3/4), the k_l = 0 level skipped."""
    return sum(k * naive_dice_ce(levels[lv][b], targets[lv][b, 0]) for lv, k in enumerate(DS4) if k)


def test_expert_term_with_four_deep_supervision_levels_matches_naive_per_sample_sum():
    experts, _, _, targets = four_level_batch(seed=3)
    modality = [1, 0, 1]  # per-sample indicator 1[X_b in M_i]
    naive = sum(naive_deep_supervised(experts[m], targets, b) for b, m in enumerate(modality))
    w = deep_supervision_weights(4)
    assert w.tolist() == pytest.approx(DS4)
    got = expert_specialisation_loss(experts, targets, torch.tensor(modality), w)
    assert got.item() == pytest.approx(naive, abs=1e-5)  # summed over the batch (official code)
    mean = expert_specialisation_loss(experts, targets, torch.tensor(modality), w, reduction="mean")
    assert mean.item() == pytest.approx(naive / 3, abs=1e-5)


def test_curriculum_loss_with_four_levels_matches_naive_eq2_to_4():
    experts, fused, target, targets = four_level_batch(seed=4)
    modality = [2, 2, 0]
    l_experts = sum(naive_deep_supervised(experts[m], targets, b) for b, m in enumerate(modality))  # batch sum
    l_mome = sum(naive_deep_supervised(fused, targets, b) for b in range(3)) / 3  # Eq. 4, batch mean
    for epoch, f in [(0, 1.0), (30, 0.49), (100, 0.0)]:
        out = curriculum_loss(fused, experts, target, torch.tensor(modality), epoch=epoch, num_epochs=100)
        assert out["loss"].item() == pytest.approx(f * l_experts + (1 - f) * l_mome, abs=1e-5)
        assert out["experts"].item() == pytest.approx(l_experts, abs=1e-5)
        assert out["mome"].item() == pytest.approx(l_mome, abs=1e-5)
    off = curriculum_loss(fused, experts, target, torch.tensor(modality), epoch=30, num_epochs=100, curriculum=False)
    assert off["loss"].item() == pytest.approx(l_mome, abs=1e-5)
