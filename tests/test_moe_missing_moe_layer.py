"""Novosad Eq. (3): the fused MoE conv equals the naive gated sum of N expert convs (values and gradients).

Run: .venv/bin/python -m pytest -q tests/test_moe_missing_moe_layer.py
"""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_missing.model import DynamicConv3d, MoEConv3d

CODES = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # a different code per sample


def naive_moe(x, code, weight, bias, gate_w, gate_b, padding):
    """sum_n phi(m)_n E_n(x) one sample and one expert at a time, with the gate written out by hand."""
    outs = []
    for b in range(x.shape[0]):
        logits = gate_w @ code[b] + gate_b
        phi = torch.exp(logits) / torch.exp(logits).sum()
        y = sum(phi[n] * F.conv3d(x[b : b + 1], weight[n], bias[n], padding=padding) for n in range(weight.shape[0]))
        outs.append(y)
    return torch.cat(outs)


def assert_close(actual, expected, atol, name):
    diff = (actual - expected).abs()
    assert diff.max() <= atol, f"{name}: max diff {diff.max():.3g}, mean {diff.mean():.3g}"


@pytest.mark.parametrize("kernel_size", [3, 1])
def test_fused_equals_naive_sum_forward_and_gradients(kernel_size):
    torch.manual_seed(0)
    layer = MoEConv3d(in_channels=5, out_channels=6, kernel_size=kernel_size, num_experts=4, num_modalities=3)
    # float64: a float32 weight gradient sums hundreds of O(1) products and rounds at ~1e-5 by itself
    layer = layer.double()
    with torch.no_grad():  # larger gate weights so that the three codes get clearly different mixtures
        layer.gate.weight.mul_(4)
    layer.train()
    layer.gate_noise = 0.0  # the noise is random, so the comparison switches it off
    x = torch.randn(3, 5, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 6, 6, 7, 5, dtype=torch.float64)

    fused = layer(x, CODES)
    fused.backward(grad_out)
    grads_fused = [t.grad.clone() for t in (x, layer.weight, layer.bias, layer.gate.weight, layer.gate.bias)]

    params = [p.detach().clone().requires_grad_(True) for p in (layer.weight, layer.bias, layer.gate.weight,
                                                                 layer.gate.bias)]  # fmt: skip
    x2 = x.detach().clone().requires_grad_(True)
    naive = naive_moe(x2, CODES.double(), *params, padding=kernel_size // 2)
    naive.backward(grad_out)

    assert fused.shape == (3, 6, 6, 7, 5)  # same padding keeps the spatial size
    assert_close(fused, naive, 1e-5, "output")
    for name, g_fused, g_naive in zip(("x", "weight", "bias", "gate.weight", "gate.bias"), grads_fused,
                                      [x2.grad, *(p.grad for p in params)]):  # fmt: skip
        assert_close(g_fused, g_naive, 1e-5, f"grad {name}")
    # the samples really are mixed differently
    phi = layer.gate_weights(CODES.double(), noise=False)
    assert (phi[0] - phi[1]).abs().max() > 0.1
    # and the layer's own N-conv form agrees too (used by the benchmark)
    assert_close(layer.naive_forward(x.detach(), CODES.double()), naive.detach(), 1e-5, "naive_forward")


def test_each_expert_is_initialised_like_a_standalone_conv3d():
    torch.manual_seed(0)
    layer = MoEConv3d(in_channels=16, out_channels=32, kernel_size=3, num_experts=4, num_modalities=3)
    bound = 1 / math.sqrt(16 * 27)  # nn.Conv3d: kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(fan_in), +)
    for n in range(4):
        w = layer.weight[n]
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound  # fan-in of one expert, not of N
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # std of U(-b, b)
        assert layer.bias[n].abs().max() <= bound
    assert not torch.equal(layer.weight[0], layer.weight[1])  # independent experts


def test_gate_noise_only_in_training_and_softmax_rows():
    torch.manual_seed(0)
    layer = MoEConv3d(2, 2, 3, num_experts=4, num_modalities=3, gate_noise=0.2)
    layer.eval()
    phi = layer.gate_weights(CODES)
    torch.testing.assert_close(phi, torch.softmax(CODES @ layer.gate.weight.T + layer.gate.bias, dim=1))
    torch.testing.assert_close(phi.sum(1), torch.ones(3))
    layer.train()
    assert not torch.allclose(layer.gate_weights(CODES), phi)
    torch.testing.assert_close(layer.gate_weights(CODES, noise=False), phi)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        MoEConv3d(2, 2, 2, num_experts=4, num_modalities=3)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        MoEConv3d(2, 2, 3, num_experts=0, num_modalities=3)
    layer = MoEConv3d(2, 2, 3, num_experts=4, num_modalities=3)
    with pytest.raises(ValueError, match=r"code must be \(B, 3\)"):
        layer(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2))


def test_dynamic_stem_scales_each_kernel_pair_and_the_bias_by_the_controller():
    torch.manual_seed(0)
    layer = DynamicConv3d(in_channels=3, out_channels=4, kernel_size=3, num_modalities=3)
    x = torch.randn(3, 3, 5, 5, 5)
    out = layer(x, CODES)
    for b in range(3):
        params = layer.controller.weight @ CODES[b] + layer.controller.bias  # (4*3 + 4,)
        scale = params[:12].view(4, 3, 1, 1, 1)
        expected = F.conv3d(x[b : b + 1], layer.weight * scale, layer.bias * params[12:], padding=1)  # b * s_b(m)
        torch.testing.assert_close(out[b : b + 1], expected, atol=1e-5, rtol=1e-5)
