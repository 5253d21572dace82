"""The gating network of SAM-Med3D-MoE (paper Sec. 2.2, Fig. 3): scores over the experts from the image and
prompt embeddings.

Paper steps, each followed by a residual connection and a LayerNorm:
(1) self-attention on the prompt embedding X_p; (2) cross-attention, X_p as query, image embedding X_i as
key/value; (3) MLP on X_p; (4) cross-attention, X_i as query, X_p as key/value; then (5) two fully connected
layers and a softmax -> S in R^m.
Choices the paper leaves open (no public code exists): X_p is the mean of the sparse prompt tokens (points or
box corners, incl. SAM's padding token); the image tokens get the dense PE added on the key/query side as in
SAM's decoder; the image tokens after (4) are mean-pooled before (5); m = 1 + number of specific experts, class 0
being the general expert, so a prompt of an original task has a target class too. With X_p a single token, the
self-attention (1) reduces to a linear map (softmax over one key = 1: out_proj(v_proj(X_p))); it is kept as
written in the paper. Activations: GELU in the MLP (3) (the paper names none), ReLU between the two FC layers (5).
In the interaction the gate sees one step's prompt tokens only (the newest click, or the box), so it re-decides
per click.
"""

import torch
from torch import nn

from sam_med3d_moe.config import GateConfig
from sam_med3d_moe.mask_decoder import Attention


class GatingNetwork(nn.Module):
    """Prompt/image embeddings -> expert logits (B, m); `scores = logits.softmax(-1)`."""

    def __init__(self, cfg: GateConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.self_attn = Attention(dim, cfg.heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_prompt_to_image = Attention(dim, cfg.heads, downsample_rate=cfg.downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, cfg.mlp_dim), nn.GELU(), nn.Linear(cfg.mlp_dim, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.cross_attn_image_to_prompt = Attention(dim, cfg.heads, downsample_rate=cfg.downsample_rate)
        self.norm4 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.hidden_dim)
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.num_classes)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """Args:
            image_embeddings: (B, C, g, g, g) (the frozen image encoder's output).
            image_pe: (1, C, g, g, g) dense positional encoding.
            sparse: (B, Nt, C) sparse prompt embeddings (Nt >= 1).
        Returns:
            logits (B, m) over [general, expert 1, ..., expert m-1].
        """
        if sparse.shape[1] == 0:
            raise ValueError("the gate needs at least one point or box prompt token")
        x_i = image_embeddings.flatten(2).transpose(1, 2)  # (B, C, g, g, g) -> (B, g^3, C)
        pe = image_pe.flatten(2).transpose(1, 2)  # (1, g^3, C)
        x_p = sparse.mean(dim=1, keepdim=True)  # (B, 1, C)
        x_p = self.norm1(x_p + self.self_attn(q=x_p, k=x_p, v=x_p))
        x_p = self.norm2(x_p + self.cross_attn_prompt_to_image(q=x_p, k=x_i + pe, v=x_i))
        x_p = self.norm3(x_p + self.mlp(x_p))
        x_i = self.norm4(x_i + self.cross_attn_image_to_prompt(q=x_i + pe, k=x_p, v=x_p))
        return self.fc2(torch.relu(self.fc1(x_i.mean(dim=1))))
