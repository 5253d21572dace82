"""The Swin Transformer 3D encoder of SwinUNETR ("Swin encoder" box of BrainSegFounder Fig. 1).

Patch embedding (2^3 patches) -> four stages of shifted-window attention blocks, each stage ending in a
patch merging (2x channels, 1/2 resolution) -> five hidden states, layer-normalised without affine.
Module and parameter names follow MONAI's `SwinTransformer` (attribute `swinViT` of `SwinUNETR`) so that
Swin-UNETR and BrainSegFounder checkpoints load with `strict=True`.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def window_and_shift(dims, window: int, shift: int) -> tuple[tuple, tuple]:
    """Per-axis window and shift for a (D, H, W) grid: an axis no longer than the window is one window
    of its own length and is not shifted (as MONAI's `get_window_size`)."""
    windows = tuple(d if d <= window else window for d in dims)
    shifts = tuple(0 if d <= window else shift for d in dims)
    return windows, shifts


def window_partition(x: torch.Tensor, windows) -> torch.Tensor:
    """(B, D, H, W, C) -> (B * nW, wd * wh * ww, C), windows in (d, h, w) raster order."""
    B, D, H, W, C = x.shape
    wd, wh, ww = windows
    x = x.view(B, D // wd, wd, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, C)


def window_reverse(windows_x: torch.Tensor, windows, dims) -> torch.Tensor:
    """(B * nW, wd * wh * ww, C) -> (B, D, H, W, C), the inverse of `window_partition`."""
    D, H, W = dims
    wd, wh, ww = windows
    x = windows_x.view(-1, D // wd, H // wh, W // ww, wd, wh, ww, windows_x.shape[-1])
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, D, H, W, windows_x.shape[-1])


def shifted_window_mask(dims, windows, shifts, device) -> torch.Tensor:
    """Additive attention mask of the shifted windows, (nW, n, n): 0 between tokens of the same region, -100
    between tokens that the cyclic shift brought together from different regions.

    Along each shifted axis of padded length P the regions are [0, P - w), [P - w, P - s), [P - s, P).
    """
    region = torch.zeros(dims, device=device)
    for axis, (size, w, s) in enumerate(zip(dims, windows, shifts)):
        if s == 0:
            continue
        idx = torch.arange(size, device=device)
        label = (idx >= size - w).long() + (idx >= size - s).long()  # 0, 1, 2 per region
        shape = [1, 1, 1]
        shape[axis] = size
        region = region * 3 + label.view(shape)  # a distinct code for each of the 27 region combinations
    region_windows = window_partition(region[None, ..., None], windows).squeeze(-1)  # (nW, n)
    different = region_windows[:, None, :] != region_windows[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, -100.0)


def relative_position_index(window: int) -> torch.Tensor:
    """(n, n) index into the (2w-1)^3 bias table for every pair of tokens of a w^3 window, n = w^3."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(window)] * 3, indexing="ij")).flatten(1)  # (3, n)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (n, n, 3), offsets >= 0
    side = 2 * window - 1
    return rel[..., 0] * side * side + rel[..., 1] * side + rel[..., 2]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):  # fmt: skip
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 3, num_heads))
        # persistent: MONAI saves it, so checkpoints carry it and strict loading expects it
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Args:
            x: (B * nW, n, C) tokens of each window.
            mask: (nW, n, n) additive shift mask, or None for unshifted windows.
        Returns:
            (B * nW, n, C).
        """
        Bw, n, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(Bw, n, 3, h, C // h).permute(2, 0, 3, 1, 4)  # 3 x (B*nW, h, n, C/h)
        # MONAI quirk kept for checkpoint fidelity: a shrunken window (n < w^3) takes the n x n corner of the
        # full window's index rather than its own relative positions.
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].view(n, n, h).permute(2, 0, 1)  # (h, n, n)
        if mask is not None:
            nW = mask.shape[0]
            # group the windows of one image so the (nW, 1, n, n) mask broadcasts over images and heads
            q, k, v = (t.reshape(Bw // nW, nW, h, n, C // h) for t in (q, k, v))
            bias = bias[None] + mask[:, None]  # (nW, h, n, n)
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1) + bias, dim=-1)
        out = F.dropout(attn, self.attn_drop, self.training).to(v.dtype) @ v
        out = out.reshape(Bw, h, n, C // h).transpose(1, 2).reshape(Bw, n, C)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """Linear (C -> r C) -> GELU -> dropout -> Linear (r C -> C) -> dropout; MONAI names `linear1/linear2`."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.linear2(self.drop(F.gelu(self.linear1(x)))))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch per sample with probability p, rescale the kept ones."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype) >= p
    return x * keep / (1.0 - p)


class SwinBlock(nn.Module):
    """x + attn(norm1(x)) in (shifted) windows, then x + mlp(norm2(x)); tensors are (B, D, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, window: int, shifted: bool, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path_rate: float = 0.0,
                 use_checkpoint: bool = False):  # fmt: skip
        super().__init__()
        self.window = window
        self.shift = window // 2 if shifted else 0
        self.drop_path_rate = drop_path_rate
        self.use_checkpoint = use_checkpoint
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def attention_branch(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, D, H, W, C = x.shape
        windows, shifts = window_and_shift((D, H, W), self.window, self.shift)
        x = self.norm1(x)
        pads = [(w - s % w) % w for s, w in zip((D, H, W), windows)]
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))  # zero-pad D, H, W at the end to whole windows
        padded = x.shape[1:4]
        shifted = any(shifts)
        if shifted:
            x = torch.roll(x, shifts=tuple(-s for s in shifts), dims=(1, 2, 3))
        x = self.attn(window_partition(x, windows), mask if shifted else None)
        x = window_reverse(x, windows, padded)
        if shifted:
            x = torch.roll(x, shifts=shifts, dims=(1, 2, 3))
        return x[:, :D, :H, :W].contiguous()

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Args:
            x: (B, D, H, W, C).
            mask: the stage's shift mask (nW, n, n) for the padded grid, or None.
        Returns:
            (B, D, H, W, C).
        """
        if self.use_checkpoint and torch.is_grad_enabled():  # recompute the branches in backward: less memory
            attn_out = checkpoint(self.attention_branch, x, mask, use_reentrant=False)
            x = x + drop_path(attn_out, self.drop_path_rate, self.training)
            return x + drop_path(checkpoint(self.mlp_branch, x, use_reentrant=False), self.drop_path_rate,
                                 self.training)  # fmt: skip
        x = x + drop_path(self.attention_branch(x, mask), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp_branch(x), self.drop_path_rate, self.training)


# Offsets (d, h, w) of the eight voxels of each 2^3 cell, in the order they are concatenated along channels.
MERGE_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))
# MONAI < 1.5 (the released BrainSegFounder and Swin-UNETR weights): slots 4-6 repeat two cells and skip two.
LEGACY_MERGE_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))


class PatchMerging(nn.Module):
    """Concatenate each 2^3 cell's 8 voxels along channels, LayerNorm(8C), Linear(8C -> 2C, no bias)."""

    def __init__(self, dim: int, legacy_order: bool = False):
        super().__init__()
        self.order = LEGACY_MERGE_ORDER if legacy_order else MERGE_ORDER
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(8 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W, C) with even D, H, W -> (B, D/2, H/2, W/2, 2C)."""
        x = torch.cat([x[:, d::2, h::2, w::2] for d, h, w in self.order], dim=-1)  # (B, D/2, H/2, W/2, 8C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """One encoder stage (MONAI `BasicLayer`): blocks alternating plain and shifted windows, then merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, drop_path_rates, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, use_checkpoint: bool = False,
                 legacy_merging: bool = False):  # fmt: skip
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, shifted=i % 2 == 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop,
                      attn_drop=attn_drop, drop_path_rate=drop_path_rates[i], use_checkpoint=use_checkpoint)
            for i in range(depth)
        )  # fmt: skip
        self.downsample = PatchMerging(dim, legacy_order=legacy_merging)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, 2C, D/2, H/2, W/2)."""
        B, C, D, H, W = x.shape
        windows, shifts = window_and_shift((D, H, W), self.window, self.window // 2)
        padded = [-(-s // w) * w for s, w in zip((D, H, W), windows)]
        mask = shifted_window_mask(padded, windows, shifts, x.device) if any(shifts) else None  # built once per stage
        x = x.permute(0, 2, 3, 4, 1)  # (B, C, D, H, W) -> (B, D, H, W, C)
        for block in self.blocks:
            x = block(x, mask)
        return self.downsample(x).permute(0, 4, 1, 2, 3)  # (B, D/2, H/2, W/2, 2C) -> (B, 2C, D/2, H/2, W/2)


class PatchEmbed(nn.Module):
    """Non-overlapping 2^3 patches -> embed_dim channels (a strided Conv3d)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int = 2):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, embed_dim, D/2, H/2, W/2)."""
        return self.proj(x)


class SwinEncoder(nn.Module):
    """Swin Transformer 3D encoder (MONAI `SwinTransformer`); stages are `layers1..layers4`, each a one-element
    ModuleList as in MONAI so the state_dict keys read `layersN.0.*`."""

    def __init__(self, in_channels: int, embed_dim: int = 48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
                 window: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, use_checkpoint: bool = False,
                 legacy_merging: bool = False):  # fmt: skip
        super().__init__()
        self.patch_embed = PatchEmbed(in_channels, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        n = sum(depths)  # stochastic depth grows linearly with the block index, from 0 to drop_path_rate
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            stage = SwinStage(embed_dim * 2**i, depth, heads, window, rates[sum(depths[:i]) : sum(depths[: i + 1])],
                              mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                              use_checkpoint=use_checkpoint, legacy_merging=legacy_merging)  # fmt: skip
            self.add_module(f"layers{i + 1}", nn.ModuleList([stage]))

    @staticmethod
    def channel_norm(x: torch.Tensor) -> torch.Tensor:
        """LayerNorm over channels without affine parameters (MONAI `proj_out(normalize=True)`)."""
        return F.layer_norm(x.permute(0, 2, 3, 4, 1), x.shape[1:2]).permute(0, 4, 1, 2, 3)

    def forward(self, x: torch.Tensor, normalize: bool = True) -> list[torch.Tensor]:
        """Args:
            x: (B, C_in, D, H, W) with D, H, W divisible by 32.
            normalize: layer-normalise the returned hidden states (SwinUNETR and the SSL head do).
        Returns:
            Five hidden states (B, 48 * 2^i, D / 2^(i+1), H / 2^(i+1), W / 2^(i+1)), i = 0..4 (embed_dim 48).
        """
        hidden = [self.pos_drop(self.patch_embed(x))]
        for stage in (self.layers1, self.layers2, self.layers3, self.layers4):
            hidden.append(stage[0](hidden[-1]))
        return [self.channel_norm(h) for h in hidden] if normalize else hidden
