"""Small layers used by all three SAM-Med3D modules: channel LayerNorm for 3D feature maps and an MLP."""

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, D, H, W) map (eps 1e-6, as SAM's LayerNorm2d)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, C, D, H, W). Returns: (B, C, D, H, W), normalised per voxel over C."""
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)  # biased variance, as nn.LayerNorm
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (SAM's hypernetwork and IoU-head MLP).

    State-dict keys `layers.{i}.weight/bias` match the official module.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (..., input_dim). Returns: (..., output_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
