"""The 3D mask decoder of SAM-Med3D (paper Fig. 2, "3D Mask Decoder" = the general expert; the task experts are
copies of it): a two-way transformer between prompt tokens and image tokens, 4x transposed-conv upscaling,
hypernetwork MLPs that turn mask tokens into per-voxel weights, and an IoU head.

The LayerNorms here use PyTorch's default eps 1e-5 (the image encoder uses 1e-6), as the official module.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from sam_med3d_moe.config import SamConfig
from sam_med3d_moe.layers import MLP, LayerNorm3d


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by `downsample_rate`."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(dim, internal)
        self.v_proj = nn.Linear(dim, internal)
        self.out_proj = nn.Linear(internal, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Args: q (B, Nq, dim), k and v (B, Nk, dim). Returns: (B, Nq, dim)."""
        q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        B, Nq, C = q.shape
        q = q.reshape(B, Nq, self.num_heads, -1).transpose(1, 2)  # (B, nh, Nq, C/nh)
        k = k.reshape(B, k.shape[1], self.num_heads, -1).transpose(1, 2)
        v = v.reshape(B, v.shape[1], self.num_heads, -1).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, Nq, C)  # heads back into channels
        return self.out_proj(out)


class MLPBlock3D(nn.Module):
    """Linear -> ReLU -> Linear (keys `lin1`, `lin2`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayAttentionBlock3D(nn.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention; each followed
    by a residual and a LayerNorm. The first layer's self-attention has no PE and no residual (its output
    replaces the tokens), as in SAM."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock3D(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: queries/query_pe (B, Nt, dim) tokens, keys/key_pe (B, Ni, dim) image. Returns: (queries, keys)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=queries + query_pe, k=keys + key_pe, v=keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=keys + key_pe, k=queries + query_pe, v=queries))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    """`depth` two-way blocks and a final token->image attention."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock3D(dim, num_heads, mlp_dim, skip_first_layer_pe=i == 0) for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image_embedding, image_pe, point_embedding) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: image_embedding, image_pe (B, C, g, g, g); point_embedding (B, Nt, C).
        Returns: tokens (B, Nt, C), image tokens (B, g^3, C)."""
        keys = image_embedding.flatten(2).permute(0, 2, 1)  # (B, C, g, g, g) -> (B, g^3, C)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=key_pe)
        attn = self.final_attn_token_to_image(q=queries + point_embedding, k=keys + key_pe, v=keys)
        return self.norm_final_attn(queries + attn), keys


class MaskDecoder3D(nn.Module):
    """Image + prompt embeddings -> low-resolution mask logits (B, 1 or 3, 4g, 4g, 4g) and IoU predictions."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        dim = cfg.prompt_dim
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer3D(cfg.decoder_depth, dim, cfg.decoder_heads, cfg.decoder_mlp_dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, cfg.iou_head_hidden_dim, self.num_mask_tokens, 3)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks.

        Args:
            image_embeddings: (B_img, C, g, g, g); repeated to the prompt batch if B_img differs from it.
            image_pe: (1 or B, C, g, g, g) from `PromptEncoder3D.get_dense_pe()`.
            sparse_prompt_embeddings: (B, Nt, C).
            dense_prompt_embeddings: (B, C, g, g, g).
            multimask_output: False -> mask 0 only (what SAM-Med3D trains and evaluates); True -> masks 1..3.
        Returns:
            masks: (B, 1 or 3, 4g, 4g, 4g) logits; iou_pred: (B, 1 or 3).
        """
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(sparse_prompt_embeddings.shape[0], -1, -1)
        tokens = torch.cat([tokens, sparse_prompt_embeddings], dim=1)  # (B, 1 + masks + Nt, C)
        src = image_embeddings
        if src.shape[0] != tokens.shape[0]:
            src = torch.repeat_interleave(src, tokens.shape[0], dim=0)
        src = src + dense_prompt_embeddings
        pos = image_pe
        if pos.shape[0] != tokens.shape[0]:
            pos = torch.repeat_interleave(pos, tokens.shape[0], dim=0)
        B, C, g = src.shape[0], src.shape[1], src.shape[2]
        hs, src = self.transformer(src, pos, tokens)
        iou_out, mask_out = hs[:, 0], hs[:, 1 : 1 + self.num_mask_tokens]
        src = src.transpose(1, 2).reshape(B, C, g, g, g)  # (B, g^3, C) -> (B, C, g, g, g)
        up = self.output_upscaling(src)  # (B, C/8, 4g, 4g, 4g)
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, x, y, z = up.shape
        masks = (hyper @ up.view(b, c, x * y * z)).view(b, -1, x, y, z)  # (B, masks, 4g, 4g, 4g)
        iou = self.iou_prediction_head(iou_out)
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou[:, sl]
