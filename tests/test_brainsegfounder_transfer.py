"""BrainSegFounder stage-to-stage weight transfer: channel adaptation by modality name, encoder-only moves.

Run: .venv/bin/python -m pytest -q tests/test_brainsegfounder_transfer.py
"""

import pytest
import torch

from brainsegfounder.model import SwinUNETR
from brainsegfounder.ssl_head import SSLHead
from brainsegfounder.transfer import (
    adapt_patch_embed,
    describe_transfer,
    encoder_weights,
    match_channels,
    transfer_encoder,
)
from shared.errors import InputError

SMALL = {"feature_size": 12, "window_size": 4}


def test_match_channels_by_name():
    assert match_channels(["FLAIR", "T1ce", "T1", "T2"], ["T1", "FLAIR"]) == [1, None, 0, None]  # expand
    assert match_channels(["T1"], ["T1", "FLAIR"]) == [0]  # drop FLAIR (ATLAS)
    assert match_channels(["T1", "T1"], ["T1", "FLAIR"]) == [0, 0]  # one modality in two channels
    assert match_channels(["T1", "T1"], ["T1", "T1"]) == [0, 1]  # modality restriction, position by position


def test_adapt_patch_embed_kaiming_and_default():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 2, 2, 2, 2), torch.randn(48)
    fresh = torch.nn.Conv3d(3, 48, 2, stride=2)
    w, b = adapt_patch_embed(weight, bias, [1, None, 0], "kaiming", fresh)
    assert torch.equal(w[:, 0], weight[:, 1]) and torch.equal(w[:, 2], weight[:, 0]) and torch.equal(b, bias)
    # Kaiming normal, fan_out = 48 * 8, ReLU gain: std = sqrt(2 / 384) ~ 0.072
    assert 0.05 < w[:, 1].std().item() < 0.1
    w, b = adapt_patch_embed(weight, bias, [1, None, 0], "default", fresh)
    assert torch.equal(w, fresh.weight) and torch.equal(b, fresh.bias)


def test_transfer_from_ssl_head_to_swinunetr_moves_only_the_encoder():
    torch.manual_seed(0)
    source = SSLHead(2, **SMALL)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # as saved under DDP
    target = SwinUNETR(4, 3, **SMALL)
    decoder_before = target.decoder1.transp_conv.conv.weight.clone()
    report = transfer_encoder(target.swinViT, state, ["T1", "FLAIR"], ["FLAIR", "T1ce", "T1", "T2"], init="kaiming",
                              source="test")  # fmt: skip
    src_w = source.swinViT.patch_embed.proj.weight
    tgt_w = target.swinViT.patch_embed.proj.weight
    assert torch.equal(tgt_w[:, 0], src_w[:, 1]) and torch.equal(tgt_w[:, 2], src_w[:, 0])
    assert torch.equal(
        target.swinViT.layers3[0].blocks[1].mlp.linear2.weight, source.swinViT.layers3[0].blocks[1].mlp.linear2.weight
    )
    assert torch.equal(target.decoder1.transp_conv.conv.weight, decoder_before)  # decoder untouched
    assert len(report["moved"]) == len(source.swinViT.state_dict()) - 2  # all but the patch embedding
    assert report["adapted"] == ["FLAIR <- FLAIR", "T1ce <- new (kaiming init)", "T1 <- T1", "T2 <- new (kaiming init)"]
    assert {k.split(".")[0] for k in report["dropped"]} == {"rotation_head", "contrastive_head", "conv"}


def test_bare_encoder_keys_and_mismatch_are_handled():
    source = SSLHead(1, **SMALL)
    bare = {k[len("swinViT.") :]: v for k, v in source.state_dict().items() if k.startswith("swinViT.")}
    assert set(encoder_weights(bare, "x")) == set(bare)  # Swin-UNETR model_swinvit.pt style
    with pytest.raises(InputError, match="does not fit"):
        transfer_encoder(SwinUNETR(1, 1, feature_size=24, window_size=4).swinViT, bare, ["T1"], ["T1"],
                         init="kaiming", source="x")  # fmt: skip
    with pytest.raises(InputError, match="no Swin encoder"):
        encoder_weights({"decoder.weight": torch.zeros(1)}, "x.pt")


def test_position_transfer_keeps_both_stage1_filters_for_modality_restriction():
    torch.manual_seed(0)
    source = SSLHead(2, **SMALL)  # a T1 + FLAIR Stage-1 encoder
    src_w, src_b = source.swinViT.patch_embed.proj.weight, source.swinViT.patch_embed.proj.bias
    by_position, by_name = SwinUNETR(2, 3, **SMALL), SwinUNETR(2, 3, **SMALL)
    report = transfer_encoder(by_position.swinViT, source.state_dict(), ["T1", "FLAIR"], ["T1", "T1"],
                              init="kaiming", source="test", by="position")  # fmt: skip
    w = by_position.swinViT.patch_embed.proj.weight
    assert torch.equal(w[:, 0], src_w[:, 0]) and torch.equal(w[:, 1], src_w[:, 1])  # the FLAIR filter is kept
    assert torch.equal(by_position.swinViT.patch_embed.proj.bias, src_b)
    assert report["by"] == "position" and report["adapted"] == ["T1 <- T1 (input 0)", "T1 <- FLAIR (input 1)"]
    assert "patch embedding by position" in describe_transfer(report)
    report = transfer_encoder(by_name.swinViT, source.state_dict(), ["T1", "FLAIR"], ["T1", "T1"], init="kaiming",
                              source="test")  # fmt: skip
    w = by_name.swinViT.patch_embed.proj.weight
    assert torch.equal(w[:, 0], src_w[:, 0]) and torch.equal(w[:, 1], src_w[:, 0])  # by name: T1 twice
    assert report["by"] == "name" and report["adapted"] == ["T1 <- T1", "T1 <- T1"]
    with pytest.raises(InputError, match="has 2 input channel.*but 4 are asked for"):
        transfer_encoder(SwinUNETR(4, 3, **SMALL).swinViT, source.state_dict(), ["T1", "FLAIR"],
                         ["FLAIR", "T1ce", "T1", "T2"], init="kaiming", source="test", by="position")  # fmt: skip
