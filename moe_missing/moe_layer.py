"""The task-conditional MoE convolution of Novosad et al. (MICCAI 2024), Fig. 1C and Eq. (3).

The gate sees only the binary modality code m (K inputs), never the image: phi(m) = softmax(Linear(m)).
Because convolution is linear in its weights, sum_n phi_n E_n(x) = conv(x, sum_n phi_n W_n) + sum_n phi_n b_n,
so the layer mixes the expert kernels per sample and runs ONE convolution for the whole batch (CondConv):
the batch is folded into the channel axis and each sample becomes one group of a grouped convolution.

`DynamicConv3d` is the ModDrop++ dynamic stem (Liu et al., MICCAI 2022) in 3D, the "Dynamic stem [12]"
baseline of the paper's Table 1: one static kernel whose (out, in) pairs are scaled by a code-driven
controller, run with the same grouped convolution.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def per_sample_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """Convolve sample b of `x` with its own kernel `weight[b]` and bias `bias[b]`, in one conv3d call.

    Args:
        x: (B, Cin, D, H, W) input.
        weight: (B, Cout, Cin, k, k, k) one kernel per sample.
        bias: (B, Cout) one bias per sample.
        padding: zero padding on every side (stride 1).

    Returns:
        (B, Cout, D', H', W') output.
    """
    B, Cin, D, H, W = x.shape
    Cout, k = weight.shape[1], weight.shape[-3:]
    # the batch goes into the channels: group b of the grouped conv sees only sample b's channels
    folded = x.reshape(1, B * Cin, D, H, W)  # (B, Cin, D, H, W) -> (1, B*Cin, D, H, W)
    kernels = weight.reshape(B * Cout, Cin, *k)  # (B, Cout, Cin, k, k, k) -> (B*Cout, Cin, k, k, k)
    out = F.conv3d(folded, kernels, bias.reshape(B * Cout), padding=padding, groups=B)
    return out.reshape(B, Cout, *out.shape[2:])  # (1, B*Cout, D', H', W') -> (B, Cout, D', H', W')


class MoEConv3d(nn.Module):
    """Mixture of N convolutional experts gated by the modality code (Novosad et al. Eq. (3)), fused.

    x_out = sum_n phi(m)_n E_n(x_in), phi(m) = softmax(Linear(m)), computed as one convolution with the
    mixed kernel sum_n phi_n W_n and mixed bias sum_n phi_n b_n. In training, Gaussian noise of std
    `gate_noise` is added to the code before the gate (paper 3.2: "to encourage exploration"). The paper
    perturbs the modality code m itself, so inside `MoEUNet` one draw per sample and forward is shared by every
    MoE layer (the model passes it as `noise`); a layer used on its own draws its own.

    Args:
        in_channels: Cin of every expert.
        out_channels: Cout of every expert.
        kernel_size: odd cube side k; stride 1 and "same" padding k // 2.
        num_experts: N (paper: 4).
        num_modalities: K, the length of the modality code.
        gate_noise: std of the training-time noise on the code (paper: 0.2).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_experts: int,
                 num_modalities: int, gate_noise: float = 0.2):  # fmt: skip
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("num_experts", num_experts), ("num_modalities", num_modalities)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int for 'same' padding, got {kernel_size}")
        if gate_noise < 0:
            raise ValueError(f"gate_noise must be >= 0, got {gate_noise}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.num_experts, self.num_modalities, self.gate_noise = num_experts, num_modalities, gate_noise
        k = kernel_size
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels, k, k, k))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels))
        self.gate = nn.Linear(num_modalities, num_experts)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every expert as a standalone nn.Conv3d of its own shape (fan-in Cin*k^3, not N*...)."""
        fan_in = self.in_channels * self.kernel_size**3
        for n in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight.data[n], a=math.sqrt(5))  # nn.Conv3d's default
            nn.init.uniform_(self.bias.data[n], -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        self.gate.reset_parameters()

    def gate_weights(self, code: torch.Tensor, noise: torch.Tensor | bool | None = None) -> torch.Tensor:
        """phi(m) = softmax(Linear(m + noise)) of codes (B, K) -> (B, N).

        Args:
            code: (B, K) modality codes.
            noise: what is added to the code. None: a fresh N(0, gate_noise^2) draw in training mode, nothing in
                eval mode. A (B, K) tensor: added as it is (`MoEUNet` passes one draw for all its layers).
                False: nothing (the clean gates of Eq. (4) and of the gate tables).
        """
        if code.ndim != 2 or code.shape[1] != self.num_modalities:
            raise ValueError(f"code must be (B, {self.num_modalities}), got {tuple(code.shape)}")
        code = code.to(self.gate.weight.dtype)
        if noise is None and self.training and self.gate_noise > 0:
            noise = self.gate_noise * torch.randn_like(code)
        if torch.is_tensor(noise):
            if noise.shape != code.shape:
                raise ValueError(f"noise must have the code's shape {tuple(code.shape)}, got {tuple(noise.shape)}")
            code = code + noise.to(code.dtype)
        return torch.softmax(self.gate(code), dim=-1)

    def forward(self, x: torch.Tensor, code: torch.Tensor, noise: torch.Tensor | bool | None = None) -> torch.Tensor:
        """Fused Eq. (3).

        Args:
            x: (B, Cin, D, H, W) input.
            code: (B, K) float modality code (1 present, 0 missing), one per sample.
            noise: the perturbation of the code, see `gate_weights`.

        Returns:
            (B, Cout, D, H, W) output.
        """
        if x.shape[0] != code.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but code has {code.shape[0]}")
        phi = self.gate_weights(code, noise).to(x.dtype)  # (B, N)
        weight = torch.einsum("bn,noi...->boi...", phi, self.weight.to(x.dtype))  # (B, Cout, Cin, k, k, k)
        bias = phi @ self.bias.to(x.dtype)  # (B, Cout)
        return per_sample_conv3d(x, weight, bias, padding=self.kernel_size // 2)

    def naive_forward(
        self, x: torch.Tensor, code: torch.Tensor, noise: torch.Tensor | bool | None = None
    ) -> torch.Tensor:
        """Eq. (3) as printed: run all N experts on the whole batch and sum their gated outputs (N convs)."""
        phi = self.gate_weights(code, noise).to(x.dtype)  # (B, N)
        out = 0
        for n in range(self.num_experts):
            expert = F.conv3d(x, self.weight[n], self.bias[n], padding=self.kernel_size // 2)
            out = out + phi[:, n, None, None, None, None] * expert
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, num_experts={self.num_experts}, "
            f"num_modalities={self.num_modalities}, gate_noise={self.gate_noise}"
        )


class DynamicConv3d(nn.Module):
    """ModDrop++ dynamic filter conv in 3D (Liu et al. 2022): a static kernel modulated by the modality code.

    A controller Linear(K -> Cout*Cin + Cout) maps the code to a scale per (out, in) channel pair, broadcast
    over the k^3 taps, and to a scale per output channel; each sample then runs its own kernel W * s_w(m) and
    bias b * s_b(m) in one grouped conv. Both are multiplicative, as the official code
    (han-liu/ModDropPlusPlus, `tiramisu_model_dyn.py`: `w = w * sw; b = b * sb`, with the static first conv's
    weight and bias); the controller has PyTorch's default Linear initialisation, as the official 1x1 conv.

    Args:
        in_channels, out_channels, kernel_size: as nn.Conv3d (odd kernel, stride 1, same padding).
        num_modalities: K.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_modalities: int):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int for 'same' padding, got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.num_modalities = num_modalities
        conv = nn.Conv3d(in_channels, out_channels, kernel_size)  # borrowed for its standard initialisation
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone())
        self.controller = nn.Linear(num_modalities, out_channels * in_channels + out_channels)

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, D, H, W) and code (B, K) -> (B, Cout, D, H, W)."""
        B = x.shape[0]
        Cout, Cin = self.out_channels, self.in_channels
        params = self.controller(code.to(x.dtype))  # (B, Cout*Cin + Cout)
        scale = params[:, : Cout * Cin].reshape(B, Cout, Cin, 1, 1, 1)
        bias = self.bias[None] * params[:, Cout * Cin :]  # (B, Cout)
        return per_sample_conv3d(x, self.weight[None] * scale, bias, padding=self.kernel_size // 2)
