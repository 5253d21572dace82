"""The UNet of Novosad et al. Fig. 1: MoE placement (Table 1), one code per sample, gate table.

Run: .venv/bin/python -m pytest -q tests/test_moe_missing_model.py
"""

import pytest
import torch

from moe_missing.model import DynamicConv3d, MoEConv3d, MoEUNetConfig, ResidualBlock, build_model
from moe_missing.tables import gate_table

TINY = dict(features=(4, 8, 16))


def test_moe_placement_follows_table1_options():
    full = build_model(MoEUNetConfig(**TINY))
    names = [n for n, m in full.named_modules() if isinstance(m, MoEConv3d)]
    assert names == ["stem", "encoder.0.conv2", "encoder.1.conv2", "encoder.2.conv2"]  # stem + 2nd conv per block
    assert all(isinstance(b.conv2, torch.nn.Conv3d) for b in full.decoder)  # decoder stays plain
    assert len(build_model(MoEUNetConfig(**TINY, moe_encoder=False)).moe_layers()) == 1
    plain = build_model(MoEUNetConfig(**TINY, stem="plain", moe_encoder=False))
    assert plain.moe_layers() == [] and isinstance(plain.stem, torch.nn.Conv3d)
    assert isinstance(build_model(MoEUNetConfig(**TINY, stem="dynamic", moe_encoder=False)).stem, DynamicConv3d)
    expert = full.stem
    assert expert.weight.shape == (4, 4, 3, 3, 3, 3)  # N experts of the replaced conv's shape (Cout 4, Cin K=3)


def test_residual_block_is_pre_activation_with_identity():
    torch.manual_seed(0)
    block = ResidualBlock(3).eval()
    x = torch.randn(1, 3, 4, 4, 4)
    act = torch.nn.functional.leaky_relu
    h = block.conv1(act(block.norm1(x), 0.01))
    expected = x + block.conv2(act(block.norm2(h), 0.01))
    torch.testing.assert_close(block(x, torch.ones(1, 3)), expected)


def test_each_sample_is_segmented_with_its_own_code():
    torch.manual_seed(0)
    model = build_model(MoEUNetConfig(**TINY)).eval()
    with torch.no_grad():  # sharper gates so that the codes matter clearly
        for layer in model.moe_layers():
            layer.gate.weight.mul_(5)
    x = torch.randn(3, 3, 8, 8, 8)
    codes = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    with torch.no_grad():
        batch = model(x, codes)
        alone = torch.cat([model(x[b : b + 1], codes[b : b + 1]) for b in range(3)])
        other = model(x[:1], codes[1:2])
    assert batch.shape == (3, 2, 8, 8, 8)
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    assert (other - batch[:1]).abs().max() > 1e-3  # the same image with another code gives another output


def test_bad_inputs_and_config_are_refused():
    with pytest.raises(ValueError, match="stem must be one of"):
        MoEUNetConfig(stem="huge")
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        MoEUNetConfig(num_classes=1)
    model = build_model(MoEUNetConfig(**TINY))
    with pytest.raises(ValueError, match="must be divisible by 4"):
        model(torch.zeros(1, 3, 6, 8, 8), torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"x must be \(B, 3, D, H, W\)"):
        model(torch.zeros(1, 2, 8, 8, 8), torch.ones(1, 3))


def test_gate_table_lists_every_layer_and_code():
    torch.manual_seed(0)
    model = build_model(MoEUNetConfig(**TINY, num_experts=3))
    model.train()  # the table must show the clean gates even in training mode
    table = gate_table(model, ["T1", "T2", "FLAIR"])
    assert len(table) == 4 * 7
    assert [r["config"] for r in table[:7]] == ["T1", "T2", "FLAIR", "T1+T2", "T2+FLAIR", "T1+FLAIR", "T1+T2+FLAIR"]
    stem = model.stem
    codes = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]]).float()
    expected = torch.softmax(codes @ stem.gate.weight.T + stem.gate.bias, dim=1)
    got = torch.tensor([[r[f"expert_{n}"] for n in range(3)] for r in table[:7]])
    torch.testing.assert_close(got, expected.detach())


def capture_gate_inputs(model):
    """Record the input of every MoE layer's gate Linear (the noisy code m + noise) at each forward."""
    seen = []
    for layer in model.moe_layers():
        layer.gate.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def test_gate_noise_is_one_draw_per_sample_shared_by_every_moe_layer():
    torch.manual_seed(0)
    model = build_model(MoEUNetConfig(**TINY)).train()
    seen = capture_gate_inputs(model)
    codes = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    x = torch.randn(3, 3, 8, 8, 8)
    model(x, codes)
    assert len(seen) == 4  # stem + 3 encoder blocks
    for other in seen[1:]:
        torch.testing.assert_close(other, seen[0], rtol=0, atol=0)  # the same noisy code in every layer
    noise = seen[0] - codes
    assert noise.abs().min() > 0 and not torch.equal(noise[0], noise[1])  # every sample its own draw
    seen.clear()
    model(x, codes)
    assert not torch.equal(seen[0] - codes, noise)  # and every forward a new one
    seen.clear()
    eps = torch.randn(3, 3)
    model(x, codes, eps)  # the batch's own draw (training passes it, so a resumed run sees the same)
    torch.testing.assert_close(seen[0], codes + 0.2 * eps)
    model.eval()
    seen.clear()
    model(x, codes, eps)
    assert all(torch.equal(s, codes) for s in seen)  # no noise at inference


def test_gate_noise_has_the_papers_std_with_a_fixed_seed():
    torch.manual_seed(0)
    model = build_model(MoEUNetConfig(**TINY, gate_noise=0.2)).train()
    codes = torch.ones(20000, 3)
    noise = model.code_noise(codes)
    # 60,000 draws: the sample std of N(0, 0.2^2) is 0.2 +- 0.0006 (one SE); 0.2^2 = 0.04 or 1 would fail
    assert abs(noise.std().item() - 0.2) < 0.003 and abs(noise.mean().item()) < 0.003
    layer = model.stem  # a layer used on its own draws its own noise of the same size
    seen = []
    layer.gate.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    layer.gate_weights(codes)
    assert abs((seen[0] - codes).std().item() - 0.2) < 0.003
    assert model.eval().code_noise(codes) is False
