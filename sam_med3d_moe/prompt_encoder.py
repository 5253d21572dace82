"""The 3D prompt encoder of SAM-Med3D (paper Fig. 2, "Prompt Encoder"): random-Fourier positional encoding of
points (and, new here, box corners) plus learned type embeddings, and a dense embedding of the previous mask.

Compatibility details kept on purpose (the released weights were trained with them):
- `positional_encoding_gaussian_matrix` is a persistent buffer: it must come from the checkpoint.
- the Fourier features are cat[sin, cos, sin] (the sine block appears twice) to fill 3 x 128 channels.
- the dense PE of the image grid swaps the first two axes relative to point coordinates (inherited from SAM 2D:
  cell (i, j, k) is encoded as the point (j, i, k)).
"""

import math

import torch
from torch import nn

from sam_med3d_moe.config import SamConfig
from sam_med3d_moe.layers import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Fourier features of coordinates in [0, 1]^3 with a fixed random Gaussian frequency matrix (3, dim / 3)."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Args: coords (..., 3) in [0, 1]. Returns: (..., 3 * num_pos_feats) = cat[sin, cos, sin]."""
        proj = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(proj), torch.cos(proj), torch.sin(proj)], dim=-1)

    def dense(self, size: int) -> torch.Tensor:
        """PE of every cell of a size^3 grid: (3 * num_pos_feats, size, size, size).

        Channel input = (cumsum along axis 1, cumsum along axis 0, cumsum along axis 2), i.e. the first two
        axes swapped with respect to `points` (see the module docstring).
        """
        ones = torch.ones(size, size, size, device=self.positional_encoding_gaussian_matrix.device)
        along0 = (ones.cumsum(dim=0) - 0.5) / size
        along1 = (ones.cumsum(dim=1) - 0.5) / size
        along2 = (ones.cumsum(dim=2) - 0.5) / size
        pe = self.encode(torch.stack([along1, along0, along2], dim=-1))  # (S, S, S, C)
        return pe.permute(3, 0, 1, 2)

    def points(self, coords: torch.Tensor, image_size: int) -> torch.Tensor:
        """Args: coords (B, N, 3) voxel positions in tensor-axis order, already shifted to voxel centres.
        Returns: (B, N, 3 * num_pos_feats)."""
        return self.encode(coords.float() / image_size)


class PromptEncoder3D(nn.Module):
    """Sparse (points, boxes) and dense (mask) prompt embeddings for the mask decoder."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        dim, chans = cfg.prompt_dim, cfg.mask_in_chans
        self.embed_dim = dim
        self.grid = cfg.grid
        self.image_size = cfg.image_size
        self.pe_layer = PositionEmbeddingRandom3D(dim // 3)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(2))  # negative, positive
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(chans // 4),
            nn.GELU(),
            nn.Conv3d(chans // 4, chans, kernel_size=2, stride=2),
            LayerNorm3d(chans),
            nn.GELU(),
            nn.Conv3d(chans, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)
        # box corners: new parameters (not in the official model), trained with the task experts
        self.box_corner_embeddings = nn.Embedding(2, dim) if cfg.box_prompts else None

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid: (1, dim, g, g, g)."""
        return self.pe_layer.dense(self.grid).unsqueeze(0)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """Args: coords (B, N, 3) voxel indices, labels (B, N) 1 positive / 0 negative / -1 padding.
        Returns: (B, N (+1 with `pad`), dim)."""
        coords = coords.float() + 0.5  # voxel centre
        labels = labels.to(coords.device)
        if pad:  # the official encoder appends one "not a point" when there is no box
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 3)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        pe = self.pe_layer.points(coords, self.image_size)
        is_pad, is_neg, is_pos = (labels == -1)[..., None], (labels == 0)[..., None], (labels == 1)[..., None]
        pe = torch.where(is_pad, self.not_a_point_embed.weight, pe)  # padding keeps no position
        pe = pe + is_neg * self.point_embeddings[0].weight + is_pos * self.point_embeddings[1].weight
        return pe

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Args: boxes (B, 6) = (min corner, max corner) voxel indices. Returns: (B, 2, dim)."""
        if self.box_corner_embeddings is None:
            raise ValueError(
                "this prompt encoder has no box embeddings (official vit_b_ori); build it with box_prompts=True"
            )
        corners = boxes.float().reshape(-1, 2, 3) + 0.5  # (B, 6) -> (B, 2 corners, 3)
        return self.pe_layer.points(corners, self.image_size) + self.box_corner_embeddings.weight

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the prompts of a batch.

        Args:
            points: (coords (B, N, 3), labels (B, N)) in the model's input grid, tensor-axis order.
            boxes: (B, 6) min and max corners, or None.
            masks: (B, 1, 4g, 4g, 4g) low-resolution logits of the previous step, or None.
        Returns:
            sparse: (B, N_tokens, dim) point/box embeddings (a padding point is added when boxes is None).
            dense: (B, dim, g, g, g) mask embedding (`no_mask_embed` broadcast when masks is None).
        """
        if points is not None:
            batch = points[0].shape[0]
        elif boxes is not None:
            batch = boxes.shape[0]
        else:
            batch = masks.shape[0] if masks is not None else 1
        device = self.point_embeddings[0].weight.device
        sparse = torch.empty(batch, 0, self.embed_dim, device=device)
        if points is not None:
            sparse = torch.cat([sparse, self._embed_points(points[0], points[1], pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch, -1, *(self.grid,) * 3)
        return sparse, dense
