"""The 3D image encoder of SAM-Med3D (paper Fig. 2, "3D Image Encoder"): a ViT-B with 3D patches, windowed and
global attention with decomposed relative positions (ViTDet/MViTv2 style), and a convolutional neck.

Compatibility detail kept on purpose: a windowed block zero-pads the token grid to a multiple of the window
(8^3 -> one 14^3 window for vit_b_ori) and attends over the padded window *without a mask*, so the padded
tokens (zeros after norm1, hence keys/values equal to the qkv bias) take part in every softmax. The released
weights were trained that way; plain global attention over the 8^3 tokens gives different outputs.
"""

import torch
import torch.nn.functional as F
from torch import nn

from sam_med3d_moe.config import SamConfig
from sam_med3d_moe.layers import LayerNorm3d


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches -> tokens: Conv3d(kernel = stride = patch)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, 1, X, Y, Z). Returns: tokens (B, X/p, Y/p, Z/p, C)."""
        return self.proj(x).permute(0, 2, 3, 4, 1)  # (B, C, d, h, w) -> (B, d, h, w, C)


def relative_index(size: int, device) -> torch.Tensor:
    """(size, size) long tensor of q - k + size - 1: the row of the (2 size - 1, C) table for each pair."""
    coords = torch.arange(size, device=device)
    return coords[:, None] - coords[None, :] + size - 1


class Attention(nn.Module):
    """Multi-head self-attention over a cubic token grid with decomposed 3D relative-position bias.

    One (2S - 1, head_dim) table per axis for a grid of side S. The MViTv2 bias of query (i, j, l) and key
    (m, n, o) would be q(i,j,l) . R_d[i - m] + q(i,j,l) . R_h[j - n] + q(i,j,l) . R_w[l - o]. The official 3D port
    broadcasts its per-axis terms differently and actually adds
        q(i,j,l) . R_d[i - o] + q(i,j,m) . R_h[j - o] + q(i,j,n) . R_w[n - o];
    the released weights were trained with that, so it is reproduced exactly (the parity test checks it).
    """

    def __init__(self, dim: int, num_heads: int, grid: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        # zero-initialised, as the official rel_pos_zero_init=True
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, S, S, S, C) tokens of one window (or the whole grid). Returns: (B, S, S, S, C)."""
        B, D, H, W, C = x.shape
        if not D == H == W == (self.rel_pos_d.shape[0] + 1) // 2:
            raise ValueError(f"attention built for a {(self.rel_pos_d.shape[0] + 1) // 2}^3 grid got {(D, H, W)}")
        qkv = self.qkv(x).reshape(B, D * H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, D * H * W, -1).unbind(0)  # each (B*nh, N, hd)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*nh, N, N)
        idx = relative_index(D, x.device)
        r_q = q.reshape(-1, D, H, W, q.shape[-1])  # (B*nh, D, H, W, hd)
        rel_d = torch.einsum("bdhwc,dkc->bdhwk", r_q, self.rel_pos_d[idx])  # (B*nh, D, H, W, D_k)
        rel_h = torch.einsum("bdhwc,hkc->bdhwk", r_q, self.rel_pos_h[idx])
        rel_w = torch.einsum("bdhwc,wkc->bdhwk", r_q, self.rel_pos_w[idx])
        attn = attn.view(-1, D, H, W, D, H, W)  # (B*nh, qd, qh, qw, kd, kh, kw)
        # The official indexing, kept for the released weights: on these 5-D tensors the trailing key axis lands
        # last, so the d-term varies with k_w, and the h/w-terms take their query index from k_d / k_h (see the
        # class docstring). The ViTDet-style intent would be rel_d[..., None, None] with the key axis at kd.
        attn = attn + rel_d[:, :, :, :, None, None] + rel_h[:, :, :, None, :, None] + rel_w[:, :, :, None, None, :]
        attn = attn.view(-1, D * H * W, D * H * W).softmax(dim=-1)
        out = (attn @ v).view(B, self.num_heads, D, H, W, -1)
        out = out.permute(0, 2, 3, 4, 1, 5).reshape(B, D, H, W, C)  # heads back into channels
        return self.proj(out)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, int]:
    """Zero-pad a (B, S, S, S, C) grid to a multiple of `window` and cut it into windows.

    Returns:
        windows: (B * n^3, window, window, window, C) with n = padded side / window.
        padded: the padded side.
    """
    B, S, _, _, C = x.shape
    pad = (window - S % window) % window
    x = F.pad(x, (0, 0, 0, pad, 0, pad, 0, pad))  # zeros after the last token of each axis
    P, n = S + pad, (S + pad) // window
    x = x.view(B, n, window, n, window, n, window, C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window, window, window, C), P


def window_unpartition(windows: torch.Tensor, window: int, padded: int, size: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * n^3, w, w, w, C) -> (B, size, size, size, C), padding removed."""
    n = padded // window
    B = windows.shape[0] // n**3
    x = windows.view(B, n, n, n, window, window, window, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, padded, padded, padded, -1)
    return x[:, :size, :size, :size].contiguous()


class Block3D(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)) (windowed or global), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window: int, grid: int) -> None:
        super().__init__()
        self.window = window  # 0: global attention over the whole grid
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, grid=window if window > 0 else grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, S, S, S, C). Returns: (B, S, S, S, C)."""
        shortcut, size = x, x.shape[1]
        x = self.norm1(x)
        if self.window > 0:
            windows, padded = window_partition(x, self.window)
            x = window_unpartition(self.attn(windows), self.window, padded, size)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class MLPBlock(nn.Module):
    """Linear -> GELU -> Linear (keys `lin1`, `lin2` as the official MLPBlock)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class ImageEncoderViT3D(nn.Module):
    """ViT image encoder: (B, 1, I, I, I) image -> (B, prompt_dim, I/p, I/p, I/p) image embedding."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        g = cfg.grid
        self.patch_embed = PatchEmbed3D(cfg.patch_size, in_chans=1, embed_dim=cfg.encoder_dim)
        # absolute positions, added as they are (no interpolation: the input size is fixed)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, g, cfg.encoder_dim))
        self.blocks = nn.ModuleList(
            Block3D(
                cfg.encoder_dim,
                cfg.encoder_heads,
                cfg.mlp_ratio,
                window=0 if i in cfg.global_attn_indexes else cfg.window_size,
                grid=g,
            )
            for i in range(cfg.encoder_depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(cfg.encoder_dim, cfg.prompt_dim, kernel_size=1, bias=False),
            LayerNorm3d(cfg.prompt_dim),
            nn.Conv3d(cfg.prompt_dim, cfg.prompt_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(cfg.prompt_dim),
        )
        self.image_size = cfg.image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, 1, I, I, I) z-normalised image. Returns: (B, prompt_dim, g, g, g)."""
        if tuple(x.shape[1:]) != (1, *(self.image_size,) * 3):
            raise ValueError(f"image encoder expects (B, 1, {self.image_size}^3) input, got {tuple(x.shape)}")
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))  # (B, g, g, g, C) -> (B, C, g, g, g)
