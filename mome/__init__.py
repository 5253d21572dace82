"""MoME: mixture of modality experts for brain lesion segmentation (Zhang et al., MICCAI 2024)."""

from mome.config import MoMEConfig
from mome.expert import PlainUNet
from mome.gate import HierarchicalGate
from mome.model import MoME, build_mome
from mome.nnunet_import import load_nnunet_expert, load_nnunet_mome

__all__ = [
    "HierarchicalGate",
    "MoME",
    "MoMEConfig",
    "PlainUNet",
    "build_mome",
    "load_nnunet_expert",
    "load_nnunet_mome",
]
