"""Modality expert of MoME: an nnU-Net v2 `PlainConvUNet` (3D, deep supervision), written from scratch.

Module and parameter names follow dynamic_network_architectures' PlainConvUNet, minus its aliases (`all_modules.*`
and `decoder.encoder.*`), so an nnU-Net state_dict maps key by key onto this tree (see `mome/nnunet_import.py`):

    encoder.stages.{s}.0.convs.{i}.conv / .norm      stage s, block i (the first conv of stage s > 0 has stride 2)
    decoder.transpconvs.{j}                          upsampling, j = 0 is the lowest resolution
    decoder.stages.{j}.convs.{i}.conv / .norm        merge of upsampled features and skip
    decoder.seg_layers.{j}                           1x1x1 head of every decoder level (j = L-1 is full resolution)
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def per_stage(value, *, n_stages: int, name: str) -> list[tuple[int, int, int]]:
    """Expand an int, or a per-stage list of ints / 3-tuples, into one (D, H, W) tuple per stage."""
    if isinstance(value, int):
        value = [value] * n_stages
    value = list(value)
    if len(value) != n_stages:
        raise ValueError(f"{name} needs one entry per stage ({n_stages}), got {value!r}")
    out = []
    for v in value:
        v = (v, v, v) if isinstance(v, int) else tuple(int(i) for i in v)
        if len(v) != 3 or min(v) < 1:
            raise ValueError(f"{name} entries must be positive ints or 3-tuples, got {value!r}")
        out.append(v)
    return out


def he_init(module: nn.Module) -> None:
    """nnU-Net's InitWeights_He(1e-2): Kaiming-normal conv weights for LeakyReLU(0.01), zero biases."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ConvNormAct(nn.Module):
    """Conv3d -> InstanceNorm3d(affine, eps 1e-5) -> LeakyReLU(0.01): nnU-Net's ConvDropoutNormReLU, no dropout."""

    def __init__(self, *, in_channels: int, out_channels: int, kernel_size: tuple, stride: tuple, bias: bool):
        super().__init__()
        padding = [(k - 1) // 2 for k in kernel_size]  # "same" size for odd kernels, stride then halves
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.norm = nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True)
        self.nonlin = nn.LeakyReLU(negative_slope=1e-2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.norm(self.conv(x)))


class StackedConvs(nn.Module):
    """`n` ConvNormAct blocks; only the first one changes width and applies the stride."""

    def __init__(self, *, n: int, in_channels: int, out_channels: int, kernel_size: tuple, stride: tuple, bias: bool):
        super().__init__()
        blocks = [
            ConvNormAct(
                in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride, bias=bias
            )
        ]
        for _ in range(n - 1):
            blocks.append(
                ConvNormAct(
                    in_channels=out_channels,
                    out_channels=out_channels,
                    kernel_size=kernel_size,
                    stride=(1, 1, 1),
                    bias=bias,
                )
            )
        self.convs = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class PlainUNet(nn.Module):
    """nnU-Net's PlainConvUNet: strided-conv encoder, transposed-conv decoder, a seg head at every decoder level.

    Used for the experts (1 input channel -> K classes) and as the backbone of the gate (image + expert
    features -> N*K weight maps).

    Args:
        in_channels: input channels C_in.
        num_classes: output channels K of every seg head.
        features: channels per encoder stage, e.g. (32, 64, 128, 256, 320, 320); S = len(features) stages.
        kernel_sizes: conv kernel per stage (int or per-stage int / 3-tuple).
        strides: stride of the first conv of each stage (int or per-stage int / 3-tuple); stage 0 is usually 1.
        n_conv_per_stage: conv blocks per encoder stage (int or list of S).
        n_conv_per_stage_decoder: conv blocks per decoder stage (int or list of S - 1).
        conv_bias: biases in the 3x3x3 and transposed convs (nnU-Net: True).
        deep_supervision: forward returns all L = S - 1 levels if True, else the full-resolution logits only.
        checkpointing: recompute each encoder/decoder stage in backward (torch.utils.checkpoint) to save memory.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        features: tuple[int, ...],
        kernel_sizes=3,
        strides=2,
        n_conv_per_stage=2,
        n_conv_per_stage_decoder=2,
        conv_bias: bool = True,
        deep_supervision: bool = True,
        checkpointing: bool = False,
    ):
        super().__init__()
        n_stages = len(features)
        if n_stages < 2:
            raise ValueError(f"features must list at least 2 stages, got {features!r}")
        kernel_sizes = per_stage(kernel_sizes, n_stages=n_stages, name="kernel_sizes")
        strides = per_stage(strides, n_stages=n_stages, name="strides")
        n_enc = [n_conv_per_stage] * n_stages if isinstance(n_conv_per_stage, int) else list(n_conv_per_stage)
        n_dec = (
            [n_conv_per_stage_decoder] * (n_stages - 1)
            if isinstance(n_conv_per_stage_decoder, int)
            else list(n_conv_per_stage_decoder)
        )
        if len(n_enc) != n_stages or len(n_dec) != n_stages - 1 or min(n_enc + n_dec) < 1:
            raise ValueError(
                f"n_conv_per_stage {n_enc} needs {n_stages} and n_conv_per_stage_decoder {n_dec} needs "
                f"{n_stages - 1} positive entries"
            )
        # plain values that rebuild this network, stored in checkpoints next to the weights
        self.arch = dict(
            in_channels=in_channels,
            num_classes=num_classes,
            features=tuple(features),
            kernel_sizes=kernel_sizes,
            strides=strides,
            n_conv_per_stage=n_enc,
            n_conv_per_stage_decoder=n_dec,
            conv_bias=conv_bias,
        )
        self.strides = strides
        self.deep_supervision = deep_supervision
        self.checkpointing = checkpointing

        self.encoder = nn.Module()
        # each stage is wrapped in a 1-element Sequential only to reproduce nnU-Net's `stages.{s}.0.` key prefix
        self.encoder.stages = nn.ModuleList(
            nn.Sequential(
                StackedConvs(
                    n=n_enc[s],
                    in_channels=in_channels if s == 0 else features[s - 1],
                    out_channels=features[s],
                    kernel_size=kernel_sizes[s],
                    stride=strides[s],
                    bias=conv_bias,
                )
            )
            for s in range(n_stages)
        )
        # decoder stage j merges encoder stage S-1-j (lowest resolution first, as nnU-Net orders them)
        self.decoder = nn.Module()
        self.decoder.transpconvs = nn.ModuleList()
        self.decoder.stages = nn.ModuleList()
        self.decoder.seg_layers = nn.ModuleList()
        for j in range(n_stages - 1):
            below, skip, up = features[-1 - j], features[-2 - j], strides[-1 - j]
            self.decoder.transpconvs.append(nn.ConvTranspose3d(below, skip, kernel_size=up, stride=up, bias=conv_bias))
            self.decoder.stages.append(
                StackedConvs(
                    n=n_dec[j],
                    in_channels=2 * skip,
                    out_channels=skip,
                    kernel_size=kernel_sizes[-2 - j],
                    stride=(1, 1, 1),
                    bias=conv_bias,
                )
            )
            # heads are built for every level even without deep supervision so checkpoints load either way
            self.decoder.seg_layers.append(nn.Conv3d(skip, num_classes, kernel_size=1, bias=True))
        self.apply(he_init)

    @property
    def num_levels(self) -> int:
        """L: number of decoder levels (= deep-supervision outputs)."""
        return len(self.decoder.stages)

    def _maybe_checkpoint(self, fn, *args):
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _up_block(self, j: int, below: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.decoder.transpconvs[j](below)
        return self.decoder.stages[j](torch.cat([x, skip], dim=1))  # (B, 2*C_skip, d, h, w) -> (B, C_skip, ...)

    def forward_features(self, x: torch.Tensor, *, all_levels: bool | None = None):
        """Run the UNet and keep what MoME's gate needs.

        Args:
            x: (B, C_in, D, H, W); D, H, W divisible by the product of the strides.
            all_levels: compute the seg heads of all L levels (default: `self.deep_supervision`).

        Returns:
            shallow: (B, features[0], D, H, W), output of encoder stage 0 (the gate's "shallow features").
            logits: list of (B, K, d_l, h_l, w_l), highest resolution first; all L levels or only the finest.
        """
        total = [1, 1, 1]
        for stride in self.strides:
            total = [t * s for t, s in zip(total, stride)]
        if x.ndim != 5 or any(n % t for n, t in zip(x.shape[2:], total)):
            raise ValueError(f"input must be (B, C, D, H, W) with D, H, W divisible by {total}, got {tuple(x.shape)}")
        all_levels = self.deep_supervision if all_levels is None else all_levels
        skips = []
        for stage in self.encoder.stages:
            x = self._maybe_checkpoint(stage, x)
            skips.append(x)
        logits = []
        for j in range(self.num_levels):
            x = self._maybe_checkpoint(self._up_block, j, x, skips[-2 - j])
            if all_levels or j == self.num_levels - 1:
                logits.append(self.decoder.seg_layers[j](x))
        return skips[0], logits[::-1]

    def forward(self, x: torch.Tensor):
        """Segment `x` (B, C_in, D, H, W).

        Returns:
            deep supervision on: list of L logits (B, K, d_l, h_l, w_l), highest resolution first;
            off: the full-resolution logits (B, K, D, H, W).
        """
        _, logits = self.forward_features(x)
        return logits if self.deep_supervision else logits[0]
