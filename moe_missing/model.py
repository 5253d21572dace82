"""The 3D UNet of pre-activation residual blocks with task-conditional MoE layers (Novosad et al. Fig. 1A-C).

    stem conv (MoE, dynamic or plain) -> [encoder block, (stride-2 conv -> encoder block) x L]
    -> (stride-2 transposed conv + skip -> decoder block) x L -> 1x1x1 head

Every block is norm -> act -> conv -> norm -> act -> conv plus the identity (Fig. 1B); in the encoder the second
conv may be a `MoEConv3d` (Fig. 1C). All convs are 3x3x3 except the classifier. Every MoE layer sees the same
modality code, which the model's forward takes next to the image, and in training the same noisy version of it:
the noise of paper 3.2 is drawn once per sample and forward, here, and handed to every layer.
"""

from dataclasses import dataclass

import torch
from torch import nn

from moe_missing.moe_layer import DynamicConv3d, MoEConv3d

__all__ = ["MoEConv3d", "DynamicConv3d", "MoEUNetConfig", "ResidualBlock", "MoEUNet", "build_model"]

STEMS = ("moe", "plain", "dynamic")


@dataclass
class MoEUNetConfig:
    """Architecture of the segmentation model; the defaults are the paper's full model (Table 1, last row)."""

    modalities: tuple[str, ...] = ("T1", "T2", "FLAIR")  # input channels in order = bits of the code (K = 3)
    num_classes: int = 2  # background + lesion, softmax head (a 2-channel head keeps DiceCE's CE term alive)
    # widths per resolution level; the text does not print Fig. 1's sizes, these are our choice (4 downsamplings)
    features: tuple[int, ...] = (16, 32, 64, 128, 256)
    num_experts: int = 4  # N in every MoE layer (paper 3.2)
    stem: str = "moe"  # "moe" (Table 1 "MoE in stem"), "plain", or "dynamic" (ModDrop++ stem [12])
    moe_encoder: bool = True  # MoE as the second conv of every encoder block (Table 1 "MoE in encoder")
    gate_noise: float = 0.2  # std of the noise added to the code in training (paper 3.2)
    negative_slope: float = 0.01  # LeakyReLU slope of the pre-activations (not stated in the paper)

    def __post_init__(self):
        if len(self.modalities) < 1:
            raise ValueError(f"modalities must name at least one input channel, got {self.modalities!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (softmax head), got {self.num_classes}")
        if len(self.features) < 2 or min(self.features) < 1:
            raise ValueError(f"features must list >= 2 positive widths, got {self.features!r}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not self.gate_noise >= 0:
            raise ValueError(f"gate_noise must be a std >= 0, got {self.gate_noise}")

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def divisor(self) -> int:
        """Patch sides must be multiples of this (one halving per level below the first)."""
        return 2 ** (len(self.features) - 1)


class ResidualBlock(nn.Module):
    """Pre-activation residual block (Fig. 1B): x + conv2(act(norm(conv1(act(norm(x)))))), channels kept.

    InstanceNorm rather than BatchNorm: a batch mixes full and modality-dropped views, whose statistics differ.

    Args:
        channels: width C in and out.
        moe: None for a plain second conv, else (num_experts, num_modalities, gate_noise) for a MoE one (Fig. 1C).
        negative_slope: LeakyReLU slope.
    """

    def __init__(self, channels: int, moe: tuple | None = None, negative_slope: float = 0.01):
        super().__init__()
        self.norm1 = nn.InstanceNorm3d(channels, affine=True)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(channels, affine=True)
        if moe is None:
            self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        else:
            num_experts, num_modalities, gate_noise = moe
            self.conv2 = MoEConv3d(channels, channels, 3, num_experts, num_modalities, gate_noise=gate_noise)
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor, code: torch.Tensor, noise: torch.Tensor | bool | None = None) -> torch.Tensor:
        """x (B, C, D, H, W), code (B, K) and the code's noise (see `MoEConv3d.gate_weights`) -> (B, C, D, H, W)."""
        h = self.conv1(self.act(self.norm1(x)))
        h = self.act(self.norm2(h))
        h = self.conv2(h, code, noise) if isinstance(self.conv2, MoEConv3d) else self.conv2(h)
        return x + h


class MoEUNet(nn.Module):
    """The segmentation network f_theta(x, m) of the paper (Fig. 1A) for a K-channel input and its code m."""

    def __init__(self, cfg: MoEUNetConfig):
        super().__init__()
        self.cfg = cfg
        K, f = cfg.num_modalities, cfg.features
        moe = (cfg.num_experts, K, cfg.gate_noise)
        if cfg.stem == "moe":
            self.stem = MoEConv3d(K, f[0], 3, cfg.num_experts, K, gate_noise=cfg.gate_noise)
        elif cfg.stem == "dynamic":
            self.stem = DynamicConv3d(K, f[0], 3, K)
        else:
            self.stem = nn.Conv3d(K, f[0], 3, padding=1)
        encoder_moe = moe if cfg.moe_encoder else None
        self.encoder = nn.ModuleList([ResidualBlock(c, encoder_moe, cfg.negative_slope) for c in f])
        self.down = nn.ModuleList([nn.Conv3d(a, b, 3, stride=2, padding=1) for a, b in zip(f[:-1], f[1:])])
        # kernel 3, stride 2, output_padding 1 exactly doubles every side
        self.up = nn.ModuleList(
            [nn.ConvTranspose3d(b, a, 3, stride=2, padding=1, output_padding=1) for a, b in zip(f[:-1], f[1:])]
        )
        self.decoder = nn.ModuleList([ResidualBlock(c, None, cfg.negative_slope) for c in f[:-1]])
        self.head_norm = nn.InstanceNorm3d(f[0], affine=True)
        self.head = nn.Conv3d(f[0], cfg.num_classes, 1)
        self.act = nn.LeakyReLU(cfg.negative_slope)
        self.has_moe = bool(self.moe_layers())

    def moe_layers(self) -> list[MoEConv3d]:
        """Every MoE layer, stem first then encoder levels top-down (the layers l of Eq. (4))."""
        return [m for m in self.modules() if isinstance(m, MoEConv3d)]

    def code_noise(self, code: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor | bool:
        """The perturbation of the code that every MoE layer of this forward sees (paper 3.2, std `gate_noise`).

        Args:
            code: (B, K) modality codes.
            eps: (B, K) standard-normal draw (the training batch carries one, so a resumed run draws the same);
                None draws it here.

        Returns:
            gate_noise * eps (B, K) in training mode; False (no noise) in eval mode or with gate_noise 0.
        """
        if not self.training or self.cfg.gate_noise == 0 or not self.has_moe:
            return False
        if eps is None:
            eps = torch.randn_like(code)
        if eps.shape != code.shape:
            raise ValueError(f"eps must have the code's shape {tuple(code.shape)}, got {tuple(eps.shape)}")
        return self.cfg.gate_noise * eps.to(code.dtype)

    def forward(self, x: torch.Tensor, code: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the lesion classes.

        Args:
            x: (B, K, D, H, W) z-scored image, missing channels zero (Eq. (1)); sides divisible by `cfg.divisor`.
            code: (B, K) float modality code, 1 for a present channel, 0 for a missing one.
            eps: optional (B, K) standard-normal draw for the gate noise (see `code_noise`); ignored in eval mode.

        Returns:
            (B, num_classes, D, H, W) logits.
        """
        if x.ndim != 5 or x.shape[1] != self.cfg.num_modalities:
            raise ValueError(f"x must be (B, {self.cfg.num_modalities}, D, H, W), got {tuple(x.shape)}")
        if any(s % self.cfg.divisor for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by {self.cfg.divisor}")
        code = code.to(x.dtype)
        noise = self.code_noise(code, eps)  # one draw per sample, shared by every MoE layer below
        if isinstance(self.stem, MoEConv3d):
            h = self.stem(x, code, noise)
        elif isinstance(self.stem, DynamicConv3d):
            h = self.stem(x, code)
        else:
            h = self.stem(x)
        skips = []
        for level, block in enumerate(self.encoder):
            if level > 0:
                h = self.down[level - 1](h)
            h = block(h, code, noise)
            skips.append(h)
        for level in reversed(range(len(self.decoder))):
            h = self.up[level](h) + skips[level]  # additive skip: keeps every conv 3x3x3 without a projection
            h = self.decoder[level](h, code)
        return self.head(self.act(self.head_norm(h)))


def build_model(cfg: MoEUNetConfig) -> MoEUNet:
    """The model a config describes (the entry point used by train, predict and evaluate)."""
    return MoEUNet(cfg)
