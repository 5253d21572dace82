"""Novosad Eq. (1), (2), (4)-(7), DiceCE and the ramp-up w(t) against hand-worked values.

Run: .venv/bin/python -m pytest -q tests/test_moe_missing_losses.py
"""

import math

import numpy as np
import pytest
import torch

from moe_missing.losses import (
    SMOOTH,
    all_codes,
    coefficient_of_variation,
    dice_ce_loss,
    drop_modalities,
    gate_regulariser,
    modality_dropout_objective,
    moe_regulariser,
    sample_codes,
    segmentation_loss,
    self_distillation_loss,
    sigmoid_rampup,
    total_loss,
)
from moe_missing.model import MoEConv3d

LN3 = math.log(3.0)
S = SMOOTH


def two_voxels():
    """Voxel a: logits (0, ln 3) -> p = (1/4, 3/4), label 1. Voxel b: logits (0, 0) -> p = (1/2, 1/2), label 0."""
    logits = torch.tensor([[0.0, 0.0], [LN3, 0.0]]).view(1, 2, 1, 1, 2)  # (B, C, 1, 1, 2 voxels)
    return logits, torch.tensor([1, 0]).view(1, 1, 1, 2)


def two_voxel_loss():
    ce = (math.log(4 / 3) + math.log(2)) / 2
    dice_bg = 1 - (2 * 0.5 + S) / (0.75 + 1 + S)  # I = 1/2 (voxel b), sum p = 1/4 + 1/2, sum t = 1
    dice_fg = 1 - (2 * 0.75 + S) / (1.25 + 1 + S)  # I = 3/4 (voxel a), sum p = 3/4 + 1/2, sum t = 1
    return ce + (dice_bg + dice_fg) / 2


def test_all_codes_in_table_order_and_uniform_sampling():
    assert all_codes(3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]]
    assert len(all_codes(4)) == 15
    rng = np.random.default_rng(0)
    draws = sample_codes(torch.ones(7000, 3), rng)
    counts = {tuple(c): n for c, n in zip(*np.unique(draws.numpy(), axis=0, return_counts=True))}
    assert len(counts) == 7 and all(abs(n - 1000) < 120 for n in counts.values())  # 1/7 each, ~4 sigma
    partial = sample_codes(torch.tensor([[1.0, 0.0, 1.0]] * 300), rng)
    assert set(map(tuple, partial.tolist())) == {(1, 0, 0), (0, 0, 1), (1, 0, 1)}  # never the missing channel


def test_eq1_drop_modalities_zeroes_the_channels_of_absent_modalities():
    x = torch.arange(1.0, 7.0).view(2, 3, 1, 1, 1)  # sample 0: 1, 2, 3; sample 1: 4, 5, 6
    out = drop_modalities(x, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    assert out.flatten().tolist() == [1, 0, 3, 0, 5, 0]


def test_dice_ce_two_voxels_by_hand_labels_and_soft_targets():
    logits, target = two_voxels()
    assert dice_ce_loss(logits, target).item() == pytest.approx(two_voxel_loss(), abs=1e-6)
    one_hot = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).view(1, 2, 1, 1, 2)  # the same labels as probabilities
    assert dice_ce_loss(logits, one_hot).item() == pytest.approx(two_voxel_loss(), abs=1e-6)
    both = dice_ce_loss(torch.cat([logits, torch.zeros_like(logits)]), torch.cat([target, target]), reduction="none")
    # second sample p = 1/2 everywhere: CE ln 2; Dice per class 1 - (1 + S)/(1 + 1 + S)
    assert both[1].item() == pytest.approx(math.log(2) + 1 - (1 + S) / (2 + S), abs=1e-6)


def test_dice_ce_matches_monai():
    monai_losses = pytest.importorskip("monai.losses")
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 4, 5, 3)
    labels = (torch.rand(2, 1, 4, 5, 3) > 0.7).long()
    ref = monai_losses.DiceCELoss(softmax=True, to_onehot_y=True)(logits, labels)
    assert dice_ce_loss(logits, labels).item() == pytest.approx(ref.item(), abs=1e-6)
    soft = torch.softmax(torch.randn(2, 2, 4, 5, 3), dim=1)
    ref = monai_losses.DiceCELoss(softmax=True)(logits, soft)
    assert dice_ce_loss(logits, soft).item() == pytest.approx(ref.item(), abs=1e-6)


def test_eq2_exact_objective_over_the_three_codes_of_two_modalities():
    a, b = 0.5, -1.5
    x = torch.tensor([a, b]).view(1, 2, 1, 1, 1)
    y = torch.ones(1, 1, 1, 1, dtype=torch.long)

    def model(x, code):  # logit of "lesion" = sum of the present channels
        return torch.cat([torch.zeros_like(x[:, :1]), x.sum(1, keepdim=True)], dim=1)

    def by_hand(z):  # one lesion voxel, p = sigmoid(z): CE + mean of background and lesion Dice terms
        p = 1 / (1 + math.exp(-z))
        return -math.log(p) + ((1 - S / (1 - p + S)) + (1 - (2 * p + S) / (p + 1 + S))) / 2

    expected = (by_hand(a) + by_hand(b) + by_hand(a + b)) / 3  # codes 10, 01, 11
    assert modality_dropout_objective(model, x, y).item() == pytest.approx(expected, abs=1e-6)


def test_coefficient_of_variation_population_std():
    assert coefficient_of_variation(torch.tensor([1.0, 0.0, 0.0, 0.0])).item() == pytest.approx(math.sqrt(3))
    assert coefficient_of_variation(torch.tensor([0.25] * 4)).item() == pytest.approx(0.0)
    assert coefficient_of_variation(torch.tensor([0.75, 0.25])).item() == pytest.approx(0.5)  # std 1/4, mean 1/2


def test_eq4_regulariser_by_hand_and_the_sign_decision():
    specialised = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # each code its own expert, balanced on average
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # every code the same expert
    uniform = torch.full((2, 2), 0.5)
    assert gate_regulariser(specialised).item() == pytest.approx(0 - 1)  # cv(mean)=0, mean cv = 1
    assert gate_regulariser(collapsed).item() == pytest.approx(1 - 1)
    assert gate_regulariser(uniform).item() == pytest.approx(0.0)
    # with "-" the specialised gates win; with the printed "+" the uniform gates are the minimum
    assert gate_regulariser(specialised) < gate_regulariser(uniform)
    assert gate_regulariser(uniform, sign=1.0) < gate_regulariser(specialised, sign=1.0)
    assert gate_regulariser(specialised, sign=1.0).item() == pytest.approx(1.0)


def test_eq4_sums_over_layers_with_clean_gates_of_all_codes():
    torch.manual_seed(0)
    layers = [MoEConv3d(2, 2, 3, num_experts=3, num_modalities=2, gate_noise=5.0) for _ in range(2)]
    for layer in layers:
        layer.train()  # noise would change the gates: the regulariser must not use it
    codes = all_codes(2)
    expected = 0.0
    for layer in layers:
        phi = torch.softmax(codes @ layer.gate.weight.T.detach() + layer.gate.bias.detach(), dim=1)  # (3, 3)
        mean = phi.mean(0)
        cv_mean = ((mean - mean.mean()) ** 2).mean().sqrt() / mean.mean()
        cv_each = ((phi - phi.mean(1, keepdim=True)) ** 2).mean(1).sqrt() / phi.mean(1)
        expected += (cv_mean - cv_each.mean()).item()
    assert moe_regulariser(layers, codes).item() == pytest.approx(expected, abs=1e-6)
    assert moe_regulariser([], codes).item() == 0.0


def test_eq5_supervises_both_views():
    logits, target = two_voxels()
    half = math.log(2) + 1 - (1 + S) / (2 + S)  # p = 1/2 everywhere (see the DiceCE test)
    value = segmentation_loss(logits, torch.zeros_like(logits), target).item()
    assert value == pytest.approx(two_voxel_loss() + half, abs=1e-6)


def test_eq6_softened_teacher_by_hand_and_no_gradient_to_the_teacher():
    teacher = torch.tensor([0.0, 2 * LN3]).view(1, 2, 1, 1, 1).requires_grad_(True)  # /tau -> q = (1/4, 3/4)
    student = torch.zeros(1, 2, 1, 1, 1, requires_grad=True)  # p = (1/2, 1/2) at any temperature
    loss = self_distillation_loss(student, teacher, tau=2.0)
    ce = math.log(2)  # -(1/4 + 3/4) ln(1/2)
    dice_bg = 1 - (2 / 8 + S) / (1 / 2 + 1 / 4 + S)
    dice_fg = 1 - (2 * 3 / 8 + S) / (1 / 2 + 3 / 4 + S)
    assert loss.item() == pytest.approx(ce + (dice_bg + dice_fg) / 2, abs=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    kl = self_distillation_loss(student, teacher, tau=2.0, form="kl")
    assert kl.item() == pytest.approx(4 * (0.25 * math.log(0.5) + 0.75 * math.log(1.5)), abs=1e-6)


def test_eq6_gradient_is_that_of_a_constant_teacher_when_both_views_share_the_model():
    torch.manual_seed(0)
    w = torch.randn(2, 3, requires_grad=True)  # a 1x1x1 "model": logits = w @ x per voxel
    x_full, x_drop = torch.randn(1, 3, 2, 2, 2), torch.randn(1, 3, 2, 2, 2)
    logits = torch.einsum("ck,bkdhw->bcdhw", w, torch.cat([x_full, x_drop]))
    full, dropped = logits.chunk(2)
    (grad_shared,) = torch.autograd.grad(self_distillation_loss(dropped, full), w, retain_graph=True)
    constant_teacher = full.detach().clone()  # not even connected to w
    (grad_const,) = torch.autograd.grad(self_distillation_loss(dropped, constant_teacher), w)
    torch.testing.assert_close(grad_shared, grad_const, rtol=0, atol=0)


def test_rampup_and_eq7_total():
    assert sigmoid_rampup(0, 300) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 300) == pytest.approx(math.exp(-5 * 0.25))  # halfway to L = 100
    assert sigmoid_rampup(100, 300) == 1.0 and sigmoid_rampup(250, 300) == 1.0
    seg, reg, sd = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    value = total_loss(seg, reg, sd, step=0, total_steps=30).item()
    assert value == pytest.approx(1 + 0.1 * 2 + math.exp(-5) * 3, rel=1e-6)
    value = total_loss(seg, reg, sd, step=10, total_steps=30, alpha=0.5, beta=2.0).item()
    assert value == pytest.approx(1 + 0.5 * 2 + 1.0 * 2 * 3, rel=1e-6)


def test_cv_gradient_is_finite_at_uniform_gates_and_exact_elsewhere():
    # a zero-initialised gate gives exactly uniform phi for every code: sqrt(0) in both terms of Eq. (4)
    layer = MoEConv3d(2, 2, 3, num_experts=4, num_modalities=3)
    torch.nn.init.zeros_(layer.gate.weight)
    torch.nn.init.zeros_(layer.gate.bias)
    reg = moe_regulariser([layer], all_codes(3))
    reg.backward()
    assert reg.item() == 0.0
    assert torch.equal(layer.gate.weight.grad, torch.zeros_like(layer.gate.weight))  # finite: the subgradient 0
    assert torch.equal(layer.gate.bias.grad, torch.zeros_like(layer.gate.bias))
    single = MoEConv3d(2, 2, 3, num_experts=1, num_modalities=3)  # one expert: phi = 1, cv = 0 always
    moe_regulariser([single], all_codes(3)).backward()
    assert torch.isfinite(single.gate.weight.grad).all()
    # away from 0 the gradient is that of the plain formula std / mean (population std)
    v = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(coefficient_of_variation(v, dim=1).sum(), v)
    (naive,) = torch.autograd.grad((v.std(dim=1, correction=0) / v.mean(dim=1)).sum(), v)
    torch.testing.assert_close(grad, naive)
