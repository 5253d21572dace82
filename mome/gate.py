"""Hierarchical gating network of MoME (paper Sec. 2.2, Eq. 1).

The gate is a full nnU-Net UNet (as in the official code) whose input is the image concatenated with the stage-0
encoder features of every expert, and whose seg head at decoder level l emits N*K channels: one voxel-wise weight
map g_i^l per expert i and class k. Channel n*K + k belongs to expert n, class k (official `g[:, 2k:2k+2]`).
With `per_class=False` (an option) it emits N channels, one map per expert shared by all classes.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mome.config import GATE_MODES, GATE_NORMS
from mome.expert import PlainUNet


class HierarchicalGate(nn.Module):
    """Voxel-wise, per-class expert weights at every decoder level.

    Args:
        unet: backbone with `in_channels = C_img + N * F0` and `num_classes = N * K`; its topology must match the
            experts' so that its level l has the shape of the experts' level l.
        num_experts: N.
        num_classes: K, classes of each expert.
        mode: "hierarchical" (paper): each level uses its own head. "basic" (Table 3 ablation, no hierarchy): only
            the finest head is used and area-averaged down to every coarser level; this is our interpretation,
            the paper names "the basic gating without hierarchical structure" without defining it, and the
            official code ships no such variant (as far as the fact sheet records).
        norm: "none" (official code: raw maps, the fused sum is treated as logits) or "softmax" over the N experts
            (per class and voxel; an option, the paper does not state a normalisation).
        per_class: True (official code): one map per expert and class. False: one map per expert, shared by all
            classes (an option): with softmax, the fused margin o_1 - o_0 is then a convex combination of the
            experts' margins, and the experts' arbitrary common logit offsets no longer enter the fused decision.
    """

    def __init__(
        self, *, unet: PlainUNet, num_experts: int, num_classes: int, mode="hierarchical", norm="none", per_class=True
    ):
        super().__init__()
        if mode not in GATE_MODES or norm not in GATE_NORMS:
            raise ValueError(f"gate mode must be in {GATE_MODES} and norm in {GATE_NORMS}, got {mode!r}, {norm!r}")
        maps_per_expert = num_classes if per_class else 1
        if unet.arch["num_classes"] != num_experts * maps_per_expert:
            raise ValueError(
                f"gate UNet has {unet.arch['num_classes']} output channels, expected num_experts * maps per expert "
                f"= {num_experts} * {maps_per_expert}"
            )
        self.unet = unet
        self.num_experts = num_experts
        self.num_classes = num_classes
        self.maps_per_expert = maps_per_expert
        self.mode = mode
        self.norm = norm

    def init_uniform(self) -> None:
        """Start from equal expert weights 1/N at every voxel, level and class.

        Zeroes the weight of every gate seg head and sets its bias to 1/N (raw maps) or 0 (softmax over experts,
        which then gives 1/N), so the fused output o^l starts as the mean of the expert logits. Not in the paper
        or the official code (which keeps nnU-Net's He init of these heads); an option for short schedules, where
        a random initial weighting scrambles the phase-1 experts' outputs and the gate has no time to recover.
        """
        for head in self.unet.decoder.seg_layers:
            nn.init.zeros_(head.weight)
            nn.init.constant_(head.bias, 1.0 / self.num_experts if self.norm == "none" else 0.0)

    def forward(self, image: torch.Tensor, shallow: list[torch.Tensor], *, level_shapes: list) -> list[torch.Tensor]:
        """Compute the gate maps g^l for the requested levels.

        Args:
            image: (B, C_img, D, H, W), the image the experts saw.
            shallow: N tensors (B, F0, D, H, W), stage-0 encoder features of the experts in expert order. Not
                detached: as in the official code, the MoME loss also trains the experts through this path.
            level_shapes: spatial shapes (d_l, h_l, w_l) of the expert outputs to weight, highest resolution first
                (all L levels, or just the finest one at inference).

        Returns:
            list of (B, N, K, d_l, h_l, w_l), one per entry of `level_shapes` (K = 1 when shared by all classes).
        """
        if len(shallow) != self.num_experts:
            raise ValueError(f"gate expects features of {self.num_experts} experts, got {len(shallow)}")
        x = torch.cat([image, *shallow], dim=1)  # (B, C_img + N*F0, D, H, W)
        all_levels = self.mode == "hierarchical" and len(level_shapes) > 1
        _, maps = self.unet.forward_features(x, all_levels=all_levels)
        gates = []
        for g in maps:
            B, _, d, h, w = g.shape
            g = g.view(B, self.num_experts, self.maps_per_expert, d, h, w)  # (B, N*K, ...) -> (B, N, K, ...)
            gates.append(torch.softmax(g, dim=1) if self.norm == "softmax" else g)
        if self.mode == "basic":
            finest = gates[0]
            B, N, K = finest.shape[:3]
            flat = finest.flatten(1, 2)  # (B, N*K, D, H, W) for 3D pooling
            # averaging keeps softmax weights summing to 1 over experts at the coarser levels
            gates = [
                F.adaptive_avg_pool3d(flat, output_size=tuple(s)).view(B, N, K, *s)
                if tuple(s) != finest.shape[3:]
                else finest
                for s in level_shapes
            ]
        got, want = [tuple(g.shape[3:]) for g in gates], [tuple(s) for s in level_shapes]
        if got != want:
            raise ValueError(f"gate maps of shapes {got} do not match the expert outputs {want}")
        return gates
