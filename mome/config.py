"""Configuration of a MoME model: five nnU-Net experts and one hierarchical gate (Zhang et al., MICCAI 2024)."""

from dataclasses import dataclass

from mome.expert import per_stage

GATE_NORMS = ("none", "softmax")
GATE_MODES = ("hierarchical", "basic")


@dataclass
class MoMEConfig:
    """Architecture of a MoME model; the defaults reproduce the official nnU-Net v2 3d_fullres setting.

    `kernel_sizes` and `strides` take one int for all stages or one entry per stage (an int or a 3-tuple); an
    imported nnU-Net release (`mome.convert_checkpoint`) stores them per stage, as read from its weights.
    """

    # expert order of the official code; expert i is supervised on modality i by the curriculum loss (Eq. 2)
    modalities: tuple[str, ...] = ("T1", "T1ce", "T2", "FLAIR", "DWI")
    in_channels: int = 1  # every expert and the gate see the same single-modality image
    num_classes: int = 2  # background + lesion (binary lesion masks)
    # nnU-Net plans for a 128^3 patch at 1 mm: 6 stages, 32 base features capped at 320
    features: tuple[int, ...] = (32, 64, 128, 256, 320, 320)
    kernel_sizes: int | tuple = 3
    # stride of each stage's first conv; None -> (1, 2, 2, ...): full resolution, then halve per stage
    strides: int | tuple | None = None
    n_conv_per_stage: int | tuple = 2  # conv-norm-act blocks per encoder stage (one int, or one per stage)
    n_conv_per_stage_decoder: int | tuple = 2  # conv-norm-act blocks per decoder stage (one int, or one per stage)
    conv_bias: bool = True  # biases in the 3x3x3 and transposed convs (nnU-Net 3d_fullres: True)
    # the official gate is a full nnU-Net with the experts' topology; None copies `features`
    gate_features: tuple[int, ...] | None = None
    gate_norm: str = "none"  # "none": raw per-class maps as in the official code; "softmax": over experts
    # True: one map per expert and class (official code); False: one map per expert shared by all classes, so the
    # fused margin o_1 - o_0 is a weighted sum of the experts' margins, independent of their logit offsets
    gate_per_class: bool = True
    gate_mode: str = "hierarchical"  # "hierarchical": one map per level (Eq. 1); "basic": finest map pooled down
    deep_supervision: bool = True  # return fused logits at every decoder level (training); False: finest only
    checkpointing: bool = False  # recompute each UNet stage in backward to save activation memory

    def __post_init__(self):
        if len(self.modalities) < 1:
            raise ValueError(f"modalities must name at least one expert, got {self.modalities!r}")
        if self.in_channels < 1 or self.num_classes < 2:
            raise ValueError(
                f"in_channels must be >= 1 and num_classes >= 2, got {self.in_channels} and {self.num_classes}"
            )
        if len(self.features) < 2:
            raise ValueError(f"features must list at least 2 stages, got {self.features!r}")
        if self.strides is None:
            self.strides = (1,) + (2,) * (len(self.features) - 1)
        per_stage(self.kernel_sizes, n_stages=len(self.features), name="kernel_sizes")
        per_stage(self.strides, n_stages=len(self.features), name="strides")
        if self.gate_features is not None and len(self.gate_features) != len(self.features):
            raise ValueError(
                f"gate_features {self.gate_features!r} must have as many stages as features {self.features!r}, "
                "because the gate emits one weight map per expert decoder level"
            )
        if self.gate_norm not in GATE_NORMS:
            raise ValueError(f"gate_norm must be one of {GATE_NORMS}, got {self.gate_norm!r}")
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {self.gate_mode!r}")

    @property
    def num_experts(self) -> int:
        return len(self.modalities)

    @property
    def num_levels(self) -> int:
        """Number of decoder levels L, i.e. of deep-supervision outputs (stages - 1)."""
        return len(self.features) - 1
