"""The self-supervised pretraining head on the Swin encoder ("SSL heads" box of BrainSegFounder Fig. 1).

Three proxy tasks of Tang et al. (CVPR 2022) on the layer-normalised bottleneck of the Swin encoder:
rotation classification (4 classes) from bottleneck token 0, a contrastive projection from token 1, and a
reconstruction decoder for masked-volume inpainting. Keys follow the Swin-UNETR / BrainSegFounder `SSLHead`
(`swinViT.*`, `rotation_head.*`, `contrastive_head.*`, `conv.{0,4,8,12,16,20}.*`), so their pretraining
checkpoints load with `strict=True`.
"""

from dataclasses import dataclass

import torch
from torch import nn

from brainsegfounder.model import SIZES, check_architecture
from brainsegfounder.swin import SwinEncoder


def reconstruction_decoder(dim: int, out_channels: int) -> nn.Sequential:
    """The "vae" upsampling decoder: 5 x [Conv3d k3 -> InstanceNorm -> LeakyReLU -> trilinear 2x], Conv3d 1x1.

    Channels dim -> dim/2 -> dim/4 -> dim/8 -> dim/16 -> dim/16 -> out_channels; undoes the encoder's 32x.
    """
    widths = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
    layers = []
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv3d(c_in, c_out, 3, padding=1), nn.InstanceNorm3d(c_out), nn.LeakyReLU(),
                   nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)]  # fmt: skip
    layers.append(nn.Conv3d(widths[-1], out_channels, 1))
    return nn.Sequential(*layers)


class SSLHead(nn.Module):
    """Swin encoder + rotation, contrastive and reconstruction heads.

    Args:
        in_channels: input channels (2 for UK Biobank T1 + FLAIR, 4 for BraTS).
        feature_size: encoder width (48); the bottleneck has 16 * feature_size channels.
        depths, num_heads: encoder layout (see `brainsegfounder.model.SIZES`).
        window_size: attention window side (7; smaller only for quick CPU runs, it changes the weights' shapes).
        projection_dim: width of the contrastive projection (512).
        drop_path_rate: maximum stochastic depth of the encoder.
        use_checkpoint: activation checkpointing of the Swin blocks.
        legacy_merging: the MONAI < 1.5 patch-merging order (released weights).
    """

    def __init__(self, in_channels: int, feature_size: int = 48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
                 window_size: int = 7, projection_dim: int = 512, drop_path_rate: float = 0.0,
                 use_checkpoint: bool = False, legacy_merging: bool = False):  # fmt: skip
        super().__init__()
        check_architecture(feature_size, depths, num_heads, window_size)
        dim = 16 * feature_size
        self.swinViT = SwinEncoder(in_channels, feature_size, depths=depths, num_heads=num_heads, window=window_size,
                                   drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint,
                                   legacy_merging=legacy_merging)  # fmt: skip
        self.rotation_head = nn.Linear(dim, 4)
        self.contrastive_head = nn.Linear(dim, projection_dim)
        self.conv = reconstruction_decoder(dim, in_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args:
            x: (B, C, D, H, W), D, H, W divisible by 32, at least 64 along one axis (two bottleneck tokens).
        Returns:
            rotation logits (B, 4), contrastive features (B, projection_dim), reconstruction (B, C, D, H, W).
        """
        bottleneck = self.swinViT(x, normalize=True)[4]  # (B, 16 fs, D/32, H/32, W/32)
        tokens = bottleneck.flatten(2).transpose(1, 2)  # (B, C, d, h, w) -> (B, d*h*w, C), last axis fastest
        if tokens.shape[1] < 2:
            raise ValueError(f"SSLHead needs at least two bottleneck tokens (an input side >= 64), got {x.shape}.")
        # as the official head: no pooling, the first token feeds the rotation task, the second the contrastive
        return self.rotation_head(tokens[:, 0]), self.contrastive_head(tokens[:, 1]), self.conv(bottleneck)


@dataclass
class SSLConfig:
    """Everything a pretraining checkpoint needs to rebuild its SSLHead."""

    in_channels: int = 2  # stage 1 on UK Biobank: T1 + FLAIR
    feature_size: int = 48  # paper: 48
    depths: tuple = SIZES["tiny"]  # tiny / small / big
    num_heads: tuple = (3, 6, 12, 24)  # head width 16 at feature size 48
    window_size: int = 7  # attention window side
    projection_dim: int = 512  # contrastive projection width
    drop_path_rate: float = 0.0  # maximum stochastic depth
    use_checkpoint: bool = False  # activation checkpointing
    legacy_merging: bool = False  # MONAI < 1.5 patch-merging order


def build_ssl_head(cfg: SSLConfig) -> SSLHead:
    """An SSLHead built from a config."""
    return SSLHead(cfg.in_channels, feature_size=cfg.feature_size, depths=tuple(cfg.depths),
                   num_heads=tuple(cfg.num_heads), window_size=cfg.window_size, projection_dim=cfg.projection_dim,
                   drop_path_rate=cfg.drop_path_rate, use_checkpoint=cfg.use_checkpoint,
                   legacy_merging=cfg.legacy_merging)  # fmt: skip
