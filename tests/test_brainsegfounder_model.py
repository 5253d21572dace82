"""BrainSegFounder SwinUNETR: paper parameter counts, Swin window/mask/merging maths vs naive loops, checkpointing.

Run: .venv/bin/python -m pytest -q tests/test_brainsegfounder_model.py
"""

import itertools

import pytest
import torch

from brainsegfounder.model import SIZES, SwinUNETR, count_parameters
from brainsegfounder.ssl_head import SSLHead
from brainsegfounder.swin import (
    PatchMerging,
    SwinEncoder,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)


@pytest.mark.parametrize(
    ("size", "total", "ssl_total", "keys"),
    [
        ("tiny", 62_191_941, 19_097_191, 159),
        ("small", 64_076_853, 20_982_103, 215),
        ("big", 69_731_589, 26_636_839, 383),
    ],
)
def test_parameter_counts_of_the_paper(size, total, ssl_total, keys):
    # Paper Table 2 / fact sheet: SwinUNETR(in=4, out=3, fs=48) totals; "encoder parameters" = SSLHead(in=1).
    with torch.device("meta"):
        model = SwinUNETR(4, 3, feature_size=48, depths=SIZES[size])
        head = SSLHead(1, feature_size=48, depths=SIZES[size])
    assert count_parameters(model) == total
    assert count_parameters(head) == ssl_total
    state = model.state_dict()
    assert len(state) == keys
    assert state["swinViT.layers1.0.blocks.0.attn.relative_position_index"].shape == (343, 343)
    assert state["swinViT.layers4.0.downsample.reduction.weight"].shape == (768, 3072)
    assert state["decoder5.transp_conv.conv.weight"].shape == (768, 384, 2, 2, 2)
    assert "encoder2.layer.conv3.conv.weight" not in state and "encoder1.layer.conv3.conv.weight" in state


def test_relative_position_index_matches_naive_loop():
    w = 3
    coords = list(itertools.product(range(w), repeat=3))
    naive = torch.tensor(
        [[(a[0] - b[0] + w - 1) * (2 * w - 1) ** 2 + (a[1] - b[1] + w - 1) * (2 * w - 1) + (a[2] - b[2] + w - 1)
          for b in coords] for a in coords]
    )  # fmt: skip
    assert torch.equal(relative_position_index(w), naive)
    assert relative_position_index(7)[0, 0] == 6 * 169 + 6 * 13 + 6  # zero offset is the centre of the 13^3 table


def test_window_partition_layout_and_roundtrip():
    x = torch.arange(2 * 4 * 2 * 2 * 1, dtype=torch.float32).view(2, 4, 2, 2, 1)  # (B, D, H, W, C)
    windows = window_partition(x, (2, 2, 2))
    assert windows.shape == (4, 8, 1)
    # second window of image 0 holds depth slices 2-3: flat indices 8..15 in (d, h, w) raster order
    assert windows[1, :, 0].tolist() == list(range(8, 16))
    assert torch.equal(window_reverse(windows, (2, 2, 2), (4, 2, 2)), x)


def naive_region_mask(dims, windows, shifts):
    """Swin's shift mask by explicit slices per axis (as the paper's reference code), then pairwise comparison."""
    region = torch.zeros(dims)
    count = 0
    slices = [[slice(0, -w), slice(-w, -s), slice(-s, None)] if s else [slice(None)] for w, s in zip(windows, shifts)]
    for sd, sh, sw in itertools.product(*slices):
        region[sd, sh, sw] = count
        count += 1
    flat = window_partition(region[None, ..., None], windows)[..., 0]  # (nW, n)
    return torch.where(flat[:, None, :] == flat[:, :, None], 0.0, -100.0)


@pytest.mark.parametrize(
    ("dims", "windows", "shifts"), [((6, 6, 6), (3, 3, 3), (1, 1, 1)), ((6, 4, 8), (3, 4, 4), (1, 0, 2))]
)
def test_shift_mask_matches_naive_slices(dims, windows, shifts):
    mask = shifted_window_mask(dims, windows, shifts, torch.device("cpu"))
    assert torch.equal(mask, naive_region_mask(dims, windows, shifts))
    assert mask[0].abs().sum() == 0  # the first window holds one region only


def test_patch_merging_orders():
    x = torch.randn(1, 4, 4, 4, 3)
    # legacy (MONAI < 1.5) list from the fact sheet: x5 repeats x2 = (0,1,0), x6 repeats x3 = (0,0,1)
    legacy = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)]
    current = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    for order, flag in ((legacy, True), (current, False)):
        merge = PatchMerging(3, legacy_order=flag)
        expected = torch.cat([x[:, d::2, h::2, w::2] for d, h, w in order], -1)
        assert torch.allclose(merge(x), merge.reduction(merge.norm(expected)))


def test_activation_checkpointing_gives_same_values_and_gradients():
    torch.manual_seed(0)
    plain = SwinEncoder(2, 12, window=4)
    ckpt = SwinEncoder(2, 12, window=4, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 2, 32, 32, 32)
    outs = [sum(h.square().mean() for h in m(x)) for m in (plain, ckpt)]
    for out in outs:
        out.backward()
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    g = [dict(m.named_parameters())["layers1.0.blocks.1.attn.relative_position_bias_table"].grad for m in (plain, ckpt)]
    assert torch.allclose(g[0], g[1], atol=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_heads"):
        SwinUNETR(4, 3, feature_size=10)
    with pytest.raises(ValueError, match="divisible by 32"):
        SwinUNETR(1, 1, feature_size=12)(torch.zeros(1, 1, 48, 32, 32))


class FixedBottleneck(torch.nn.Module):
    """Stands in for the Swin encoder: hidden state 4 is a given bottleneck."""

    def __init__(self, bottleneck):
        super().__init__()
        self.bottleneck = bottleneck

    def forward(self, x, normalize=True):
        return [None] * 4 + [self.bottleneck]


def test_ssl_head_reads_rotation_from_token_0_and_contrastive_from_token_1():
    torch.manual_seed(0)
    head = SSLHead(1, feature_size=12, window_size=4, projection_dim=8)
    bottleneck = torch.zeros(2, 192, 2, 2, 1)  # (B, 16 fs, d, h, w): tokens in (d, h, w) order, w fastest
    a, b, c = torch.randn(3, 2, 192)
    bottleneck[:, :, 0, 0, 0], bottleneck[:, :, 0, 1, 0], bottleneck[:, :, 1, 0, 0] = a, b, c  # tokens 0, 1, 2
    head.swinViT = FixedBottleneck(bottleneck)
    rotation, contrastive, reconstruction = head(torch.zeros(2, 1, 64, 64, 32))
    assert torch.allclose(rotation, a @ head.rotation_head.weight.T + head.rotation_head.bias)
    assert torch.allclose(contrastive, b @ head.contrastive_head.weight.T + head.contrastive_head.bias)
    assert reconstruction.shape == (2, 1, 64, 64, 32)
