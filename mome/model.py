"""MoME: N modality experts fused voxel-wise by a hierarchical gate (Zhang et al., MICCAI 2024, Fig. 1, Eq. 1)."""

import torch
from torch import nn

from mome.config import MoMEConfig
from mome.expert import PlainUNet
from mome.gate import HierarchicalGate


class MoME(nn.Module):
    """Mixture of modality experts.

    Every expert segments the same image; the gate weights the experts' logits per voxel and class at every
    decoder level, o^l = sum_i e_i^l * g_i^l (Eq. 1). Softmax is applied to o^l only by the loss or at export.
    No modality label is needed at inference; only the finest level o^1 is used.

    Args:
        experts: N PlainUNet experts with identical topology, in the order of `MoMEConfig.modalities`.
        gate: the HierarchicalGate over these experts.
        deep_supervision: forward returns all L fused levels (training) or only the finest one (inference).
    """

    def __init__(self, *, experts: nn.ModuleList, gate: HierarchicalGate, deep_supervision: bool = True):
        super().__init__()
        if len(experts) != gate.num_experts:
            raise ValueError(f"got {len(experts)} experts but the gate weights {gate.num_experts}")
        self.experts = experts
        self.gate = gate
        self.deep_supervision = deep_supervision

    def forward(self, x: torch.Tensor, *, return_all: bool = False):
        """Segment x (B, C_img, D, H, W).

        Returns:
            deep supervision on: list of L fused logits o^l (B, K, d_l, h_l, w_l), highest resolution first;
            off: the finest fused logits (B, K, D, H, W).
            With return_all: a dict with "fused" (that list, length 1 without deep supervision),
            "experts" (N lists of per-level logits e_i^l) and "gates" (per-level maps (B, N, K, d_l, h_l, w_l);
            K is 1 for a gate shared by all classes).
        """
        shallow, expert_logits = [], []
        for expert in self.experts:
            features, logits = expert.forward_features(x, all_levels=self.deep_supervision)
            shallow.append(features)
            expert_logits.append(logits)
        gates = self.gate(x, shallow, level_shapes=[t.shape[2:] for t in expert_logits[0]])
        fused = []
        for level, g in enumerate(gates):
            e = torch.stack([logits[level] for logits in expert_logits], dim=1)  # N x (B, K, ...) -> (B, N, K, ...)
            fused.append((e * g).sum(dim=1))  # Eq. 1, (B, K, d_l, h_l, w_l)
        if return_all:
            return {"fused": fused, "experts": expert_logits, "gates": gates}
        return fused if self.deep_supervision else fused[0]


def build_expert(cfg: MoMEConfig) -> PlainUNet:
    """One modality expert: a PlainUNet with the configured topology (1 channel in, K classes out)."""
    return PlainUNet(
        in_channels=cfg.in_channels,
        num_classes=cfg.num_classes,
        features=cfg.features,
        kernel_sizes=cfg.kernel_sizes,
        strides=cfg.strides,
        n_conv_per_stage=cfg.n_conv_per_stage,
        n_conv_per_stage_decoder=cfg.n_conv_per_stage_decoder,
        conv_bias=cfg.conv_bias,
        deep_supervision=cfg.deep_supervision,
        checkpointing=cfg.checkpointing,
    )


def build_gate(cfg: MoMEConfig) -> HierarchicalGate:
    """The gate: a PlainUNet from (image + N stage-0 expert features) to N*K maps, wrapped in HierarchicalGate."""
    unet = PlainUNet(
        in_channels=cfg.in_channels + cfg.num_experts * cfg.features[0],
        num_classes=cfg.num_experts * (cfg.num_classes if cfg.gate_per_class else 1),
        features=cfg.gate_features or cfg.features,
        kernel_sizes=cfg.kernel_sizes,
        strides=cfg.strides,  # same strides as the experts, so gate level l matches expert level l
        n_conv_per_stage=cfg.n_conv_per_stage,
        n_conv_per_stage_decoder=cfg.n_conv_per_stage_decoder,
        conv_bias=cfg.conv_bias,
        deep_supervision=True,
        checkpointing=cfg.checkpointing,
    )
    return HierarchicalGate(
        unet=unet,
        num_experts=cfg.num_experts,
        num_classes=cfg.num_classes,
        mode=cfg.gate_mode,
        norm=cfg.gate_norm,
        per_class=cfg.gate_per_class,
    )


def build_mome(cfg: MoMEConfig) -> MoME:
    """Build a freshly initialised MoME model (N experts + gate) from its config."""
    experts = nn.ModuleList(build_expert(cfg) for _ in range(cfg.num_experts))
    return MoME(experts=experts, gate=build_gate(cfg), deep_supervision=cfg.deep_supervision)
