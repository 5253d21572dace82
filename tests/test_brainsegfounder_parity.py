"""BrainSegFounder SwinUNETR vs MONAI 1.6.1: same state_dict, MONAI's random weights give the same logits and grads.

Run: .venv/bin/python -m pytest -q tests/test_brainsegfounder_parity.py (skipped without monai)
"""

import pytest
import torch

from brainsegfounder.model import SwinUNETR

swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")


def _rearrange(x, pattern):
    """Stand-in for einops.rearrange (not installed): MONAI only uses pure axis permutations such as
    "b c d h w -> b d h w c"."""
    src, dst = (side.split() for side in pattern.split("->"))
    return x.permute(*[src.index(axis) for axis in dst])


@pytest.fixture(autouse=True)
def _no_einops(monkeypatch):
    monkeypatch.setattr(swin_unetr, "rearrange", _rearrange)


class LegacyMerging(swin_unetr.PatchMergingV2):
    """MONAI < 1.5 patch merging, written out from the fact sheet's slice list (x5 = x2, x6 = x3)."""

    def forward(self, x):
        order = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
        x = torch.cat([x[:, d::2, h::2, w::2] for d, h, w in order], -1)
        return self.reduction(self.norm(x))


def _pair(legacy=False, seed=0):
    torch.manual_seed(seed)
    kwargs = {"downsample": LegacyMerging} if legacy else {}
    ref = swin_unetr.SwinUNETR(in_channels=2, out_channels=3, feature_size=12, **kwargs).eval()
    ours = SwinUNETR(2, 3, feature_size=12, legacy_merging=legacy).eval()
    ref_state, own_state = ref.state_dict(), ours.state_dict()
    assert {k: v.shape for k, v in ref_state.items()} == {k: v.shape for k, v in own_state.items()}
    ours.load_state_dict(ref_state, strict=True)  # includes the relative_position_index buffers
    for key in ("swinViT.layers1.0.blocks.0.attn.relative_position_index",):
        assert torch.equal(ref_state[key], SwinUNETR(2, 3, feature_size=12).state_dict()[key])
    return ref, ours


def _close(a, b, atol=1e-5):
    diff = (a - b).abs()
    assert diff.max() <= atol, f"max |diff| {diff.max():.3g}, mean {diff.mean():.3g}"


# (64, 32, 32): the last stage (4 x 1 x 1 tokens) is smaller than the 7^3 window, so its window shrinks and
# does not shift. (128, 32, 32): the last stage (8 x 2 x 2) keeps a padded, shifted 7-window along D only.
# Stage 1 (32 x 16 x 16) always uses padded, shifted 7^3 windows. (InstanceNorm needs more than one bottleneck
# voxel, so one side must be >= 64.)


def test_same_logits_when_the_last_stage_keeps_its_window():
    ref, ours = _pair()
    x = torch.randn(1, 2, 128, 32, 32)
    with torch.no_grad():
        _close(ours(x), ref(x))


def test_same_logits_and_gradients_when_the_last_stage_is_smaller_than_the_window():
    ref, ours = _pair(seed=1)
    x = torch.randn(1, 2, 64, 32, 32)
    ref_out, own_out = ref(x), ours(x)
    _close(own_out, ref_out)
    ref_out.square().mean().backward()
    own_out.square().mean().backward()
    ref_params, own_params = dict(ref.named_parameters()), dict(ours.named_parameters())
    for key in ("swinViT.layers1.0.blocks.1.attn.relative_position_bias_table", "swinViT.patch_embed.proj.weight",
                "swinViT.layers2.0.downsample.reduction.weight", "decoder5.transp_conv.conv.weight"):  # fmt: skip
        _close(own_params[key].grad, ref_params[key].grad, atol=1e-6)


def test_legacy_merging_matches_monai_with_the_old_order():
    ref, ours = _pair(legacy=True, seed=2)
    x = torch.randn(1, 2, 64, 32, 32)
    with torch.no_grad():
        _close(ours(x), ref(x))
