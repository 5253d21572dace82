"""SAM-Med3D modules by hand: parameter count of vit_b_ori, the relative-position and PE quirks, prompt tokens.

Run: pytest tests/test_sam_med3d_moe_model.py
"""

import math

import pytest
import torch

from sam_med3d_moe.config import SamConfig, small_config
from sam_med3d_moe.image_encoder import Attention, window_partition, window_unpartition
from sam_med3d_moe.model import build_model, build_sam_med3d, load_weights
from sam_med3d_moe.prompt_encoder import PromptEncoder3D
from shared.checkpoint import save_checkpoint
from shared.errors import InputError


def test_vit_b_ori_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = build_sam_med3d()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == 100_509_232
    assert (count(model.image_encoder), count(model.prompt_encoder), count(model.mask_decoder)) == (
        92_924_928,
        8_668,
        7_575_636,
    )
    sd = model.state_dict()
    assert len(sd) == 324 and "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in sd
    assert tuple(sd["image_encoder.blocks.0.attn.rel_pos_d"].shape) == (27, 64)
    assert tuple(sd["image_encoder.blocks.5.attn.rel_pos_w"].shape) == (15, 64)


def test_box_prompts_add_exactly_two_corner_embeddings():
    with torch.device("meta"):
        plain, boxed = build_model(SamConfig()), build_model(SamConfig(box_prompts=True))
    extra = set(boxed.state_dict()) - set(plain.state_dict())
    assert extra == {"prompt_encoder.box_corner_embeddings.weight"}
    assert tuple(boxed.state_dict()[extra.pop()].shape) == (2, 384)


def test_relative_position_bias_follows_the_documented_official_formula():
    torch.manual_seed(0)
    S, C = 3, 4
    attn = Attention(dim=C, num_heads=1, grid=S)
    for p in (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w):
        torch.nn.init.normal_(p)
    x = torch.randn(1, S, S, S, C)
    # naive: softmax over keys of q.k * scale + q(i,j,l).Rd[i-o] + q(i,j,m).Rh[j-o] + q(i,j,n).Rw[n-o]
    q, k, v = attn.qkv(x).reshape(S, S, S, 3, C).unbind(3)
    rd, rh, rw = attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w
    out = torch.zeros(S, S, S, C)
    keys = [(m, n, o) for m in range(S) for n in range(S) for o in range(S)]
    for i in range(S):
        for j in range(S):
            for l in range(S):
                logits = []
                for m, n, o in keys:
                    logit = (q[i, j, l] @ k[m, n, o]) / math.sqrt(C)
                    logit = logit + q[i, j, l] @ rd[i - o + S - 1] + q[i, j, m] @ rh[j - o + S - 1]
                    logits.append(logit + q[i, j, n] @ rw[n - o + S - 1])
                w = torch.softmax(torch.stack(logits), dim=0)
                out[i, j, l] = sum(w[t] * v[key] for t, key in enumerate(keys))
    with torch.no_grad():
        assert torch.allclose(attn(x)[0], attn.proj(out), atol=1e-5)


def test_window_partition_pads_with_zeros_and_round_trips():
    x = torch.randn(2, 4, 4, 4, 3)
    windows, padded = window_partition(x, 3)
    assert padded == 6 and windows.shape == (16, 3, 3, 3, 3)
    # window (0, 0, 1) of sample 0 holds x[0, 0:3, 0:3, 3:4] then zeros
    assert torch.equal(windows[1, :, :, :1], x[0, 0:3, 0:3, 3:4]) and not windows[1, :, :, 1:].any()
    assert torch.equal(window_unpartition(windows, 3, padded, 4), x)


def test_dense_pe_swaps_the_first_two_axes_and_repeats_the_sine():
    torch.manual_seed(0)
    enc = PromptEncoder3D(small_config(prompt_dim=48, image_size=32, patch_size=8))
    G = enc.pe_layer.positional_encoding_gaussian_matrix  # (3, 16)
    pe = enc.get_dense_pe()[0]  # (48, 4, 4, 4)
    i, j, k = 1, 3, 2
    coord = torch.tensor([(j + 0.5) / 4, (i + 0.5) / 4, (k + 0.5) / 4])
    proj = 2 * math.pi * ((2 * coord - 1) @ G)
    assert torch.allclose(pe[:, i, j, k], torch.cat([proj.sin(), proj.cos(), proj.sin()]), atol=1e-6)


def test_point_tokens_by_hand_and_the_padding_point():
    torch.manual_seed(0)
    cfg = small_config(prompt_dim=48, image_size=32, patch_size=8)
    enc = PromptEncoder3D(cfg)
    G = enc.pe_layer.positional_encoding_gaussian_matrix
    coords, labels = torch.tensor([[[3, 17, 30], [0, 1, 2]]]), torch.tensor([[1, 0]])
    sparse, dense = enc(points=(coords, labels), boxes=None, masks=None)
    assert sparse.shape == (1, 3, 48) and dense.shape == (1, 48, 4, 4, 4)

    def pe(p):
        proj = 2 * math.pi * ((2 * (torch.tensor(p, dtype=torch.float) + 0.5) / 32 - 1) @ G)
        return torch.cat([proj.sin(), proj.cos(), proj.sin()])

    with torch.no_grad():
        assert torch.allclose(sparse[0, 0], pe([3, 17, 30]) + enc.point_embeddings[1].weight[0], atol=1e-5)
        assert torch.allclose(sparse[0, 1], pe([0, 1, 2]) + enc.point_embeddings[0].weight[0], atol=1e-5)
        assert torch.equal(sparse[0, 2], enc.not_a_point_embed.weight[0])
        assert torch.equal(dense[0, :, 1, 2, 3], enc.no_mask_embed.weight[0])
        box_tokens, _ = enc(points=None, boxes=torch.tensor([[1, 2, 3, 20, 21, 22]]), masks=None)
        assert box_tokens.shape == (1, 2, 48)  # no padding point with a box
        assert torch.allclose(box_tokens[0, 1], pe([20, 21, 22]) + enc.box_corner_embeddings.weight[1], atol=1e-5)


def test_official_architecture_refuses_boxes():
    enc = PromptEncoder3D(small_config(box_prompts=False))
    with pytest.raises(ValueError, match="no box embeddings"):
        enc(points=None, boxes=torch.zeros(1, 6), masks=None)


def test_load_weights_checks_every_key_and_shape(tmp_path):
    cfg = small_config(box_prompts=False)
    source = build_model(cfg)
    path = tmp_path / "plain.pt"
    save_checkpoint(path, **source.state_dict())
    loaded = build_sam_med3d(path, cfg=cfg)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))
    # an official-style state_dict (no box embeddings) loads into a box model, the corners keep their init
    boxed = build_model(small_config())
    assert load_weights(boxed, source.state_dict(), "test") == ["prompt_encoder.box_corner_embeddings.weight"]
    bad = dict(source.state_dict())
    bad["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    with pytest.raises(InputError, match=r"iou_token.weight has shape \(1, 7\)"):
        load_weights(build_model(cfg), bad, "bad.pt")
    del bad["mask_decoder.iou_token.weight"]
    with pytest.raises(InputError, match="missing"):
        load_weights(build_model(cfg), bad, "bad.pt")
