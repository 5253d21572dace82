"""SwinUNETR: the Swin encoder plus the UNETR-style convolutional decoder (BrainSegFounder Fig. 1).

    model = SwinUNETR(in_channels=4, out_channels=3)            # BrainSegFounder-Tiny, 62,191,941 parameters
    logits = model(x)                                           # x: (B, 4, D, H, W), D, H, W divisible by 32

State-dict keys, shapes and buffers equal MONAI's `SwinUNETR(use_v2=False)` (159 keys for depths 2,2,2,2), so
MONAI, Swin-UNETR and BrainSegFounder weights load with `strict=True` once a DDP `module.` prefix is stripped.
Released BrainSegFounder/Swin-UNETR weights were trained with MONAI < 1.5: build with `legacy_merging=True`.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from brainsegfounder.swin import SwinEncoder

# Paper Table 2 sizes differ only in the depth of stage 3 (the official scripts name them differently).
SIZES = {"tiny": (2, 2, 2, 2), "small": (2, 2, 6, 2), "big": (2, 2, 18, 2)}


def _conv(conv: nn.Module) -> nn.Sequential:
    """Wrap a conv as MONAI's `Convolution` does (child named `conv`), so the keys read `<name>.conv.weight`."""
    return nn.Sequential(OrderedDict(conv=conv))


class ResidualBlock(nn.Module):
    """MONAI `UnetResBlock`: conv3-IN-LReLU-conv3-IN plus a (1x1 conv-IN) shortcut when channels change, then
    LeakyReLU(0.01). Convolutions have no bias; InstanceNorm has no affine parameters."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = _conv(nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False))
        self.conv2 = _conv(nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False))
        self.norm1 = nn.InstanceNorm3d(out_channels)
        self.norm2 = nn.InstanceNorm3d(out_channels)
        self.act = nn.LeakyReLU(0.01)
        self.conv3 = _conv(nn.Conv3d(in_channels, out_channels, 1, bias=False)) if in_channels != out_channels else None
        self.norm3 = nn.InstanceNorm3d(out_channels) if self.conv3 is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C_out, D, H, W)."""
        out = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        shortcut = x if self.conv3 is None else self.norm3(self.conv3(x))
        return self.act(out + shortcut)


class EncoderBlock(nn.Module):
    """MONAI `UnetrBasicBlock(res_block=True)`: one residual block at the resolution of its input."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.layer = ResidualBlock(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class UpBlock(nn.Module):
    """MONAI `UnetrUpBlock`: 2x transposed conv, concatenate the skip, residual block."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.transp_conv = _conv(nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2, bias=False))
        self.conv_block = ResidualBlock(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, d, h, w), skip (B, C_out, 2d, 2h, 2w) -> (B, C_out, 2d, 2h, 2w)."""
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class OutBlock(nn.Module):
    """MONAI `UnetOutBlock`: a 1x1 conv with bias to the output channels (logits, no activation)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = _conv(nn.Conv3d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def check_architecture(feature_size: int, depths, num_heads, window_size: int = 7) -> None:
    """Raise ValueError (showing the bad value) unless the four-stage Swin layout is consistent."""
    if len(depths) != 4 or len(num_heads) != 4:
        raise ValueError(f"depths and num_heads need four stages each, got depths={depths} num_heads={num_heads}.")
    if min(depths) < 1 or feature_size < 1 or window_size < 1:
        raise ValueError(f"depths, feature_size and window_size must be positive, got {depths}, {feature_size}, "
                         f"{window_size}.")  # fmt: skip
    for i, heads in enumerate(num_heads):
        if heads < 1 or (feature_size * 2**i) % heads:
            raise ValueError(f"stage {i + 1} width {feature_size * 2**i} (feature_size={feature_size}) is not "
                             f"divisible by num_heads[{i}]={heads}.")  # fmt: skip


class SwinUNETR(nn.Module):
    """SwinUNETR (Hatamizadeh et al. 2022) as used by BrainSegFounder; see the module docstring.

    Args:
        in_channels: input channels (MRI modalities).
        out_channels: output channels (e.g. 3 sigmoid channels TC/WT/ET for BraTS).
        feature_size: width of the first stage (48 in the paper); stage i has feature_size * 2^i channels.
        depths: Swin blocks per stage, SIZES["tiny" | "small" | "big"].
        num_heads: attention heads per stage.
        window_size: attention window side (7).
        drop_rate, attn_drop_rate, dropout_path_rate: dropout in the Swin blocks, on attention weights, and the
            maximum stochastic-depth rate.
        use_checkpoint: activation checkpointing of the Swin blocks (less memory, ~30% more compute).
        legacy_merging: the patch-merging order of MONAI < 1.5, needed by the released weights.
    """

    def __init__(self, in_channels: int, out_channels: int, feature_size: int = 48, depths=(2, 2, 2, 2),
                 num_heads=(3, 6, 12, 24), window_size: int = 7, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 dropout_path_rate: float = 0.0, use_checkpoint: bool = False,
                 legacy_merging: bool = False):  # fmt: skip
        super().__init__()
        check_architecture(feature_size, depths, num_heads, window_size)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}.")
        fs = feature_size
        self.swinViT = SwinEncoder(in_channels, fs, depths=depths, num_heads=num_heads, window=window_size,
                                   drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                   drop_path_rate=dropout_path_rate, use_checkpoint=use_checkpoint,
                                   legacy_merging=legacy_merging)  # fmt: skip
        self.encoder1 = EncoderBlock(in_channels, fs)  # full resolution, straight from the image
        self.encoder2 = EncoderBlock(fs, fs)  # on hidden state 0 (1/2)
        self.encoder3 = EncoderBlock(2 * fs, 2 * fs)  # hidden state 1 (1/4)
        self.encoder4 = EncoderBlock(4 * fs, 4 * fs)  # hidden state 2 (1/8)
        self.encoder10 = EncoderBlock(16 * fs, 16 * fs)  # bottleneck, hidden state 4 (1/32)
        self.decoder5 = UpBlock(16 * fs, 8 * fs)  # skip: hidden state 3 (1/16) itself
        self.decoder4 = UpBlock(8 * fs, 4 * fs)
        self.decoder3 = UpBlock(4 * fs, 2 * fs)
        self.decoder2 = UpBlock(2 * fs, fs)
        self.decoder1 = UpBlock(fs, fs)
        self.out = OutBlock(fs, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: (B, in_channels, D, H, W), D, H, W divisible by 32.
        Returns:
            logits (B, out_channels, D, H, W).
        """
        if x.ndim != 5 or any(s % 32 for s in x.shape[2:]):
            raise ValueError(f"SwinUNETR needs (B, C, D, H, W) with D, H, W divisible by 32, got {tuple(x.shape)}.")
        hidden = self.swinViT(x, normalize=True)
        enc0 = self.encoder1(x)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        dec3 = self.decoder5(self.encoder10(hidden[4]), hidden[3])
        dec0 = self.decoder2(self.decoder3(self.decoder4(dec3, enc3), enc2), enc1)
        return self.out(self.decoder1(dec0, enc0))


@dataclass
class SwinUNETRConfig:
    """Everything a checkpoint needs to rebuild a SwinUNETR."""

    in_channels: int = 4  # BraTS: 4 modalities
    out_channels: int = 3  # TC, WT, ET sigmoid channels (1 for a binary lesion)
    feature_size: int = 48  # paper: 48
    depths: tuple = SIZES["tiny"]  # tiny 62M / small 64M / big 69M
    num_heads: tuple = (3, 6, 12, 24)  # head width 16 at feature size 48
    window_size: int = 7  # attention window side
    drop_rate: float = 0.0  # dropout in Swin blocks
    dropout_path_rate: float = 0.0  # maximum stochastic depth
    use_checkpoint: bool = False  # activation checkpointing (memory for compute)
    legacy_merging: bool = False  # MONAI < 1.5 patch-merging order (released weights)


def build_swinunetr(cfg: SwinUNETRConfig) -> SwinUNETR:
    """A SwinUNETR built from a config."""
    return SwinUNETR(cfg.in_channels, cfg.out_channels, feature_size=cfg.feature_size, depths=tuple(cfg.depths),
                     num_heads=tuple(cfg.num_heads), window_size=cfg.window_size, drop_rate=cfg.drop_rate,
                     dropout_path_rate=cfg.dropout_path_rate, use_checkpoint=cfg.use_checkpoint,
                     legacy_merging=cfg.legacy_merging)  # fmt: skip


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (build on `torch.device("meta")` to count a large model without allocating it)."""
    return sum(p.numel() for p in module.parameters())
