"""BrainSegFounder: SwinUNETR with two-stage self-supervised pretraining and fine-tuning (Cox et al. 2024)."""

from brainsegfounder.model import SIZES, SwinUNETR, SwinUNETRConfig, build_swinunetr
from brainsegfounder.ssl_head import SSLConfig, SSLHead, build_ssl_head

__all__ = ["SIZES", "SSLConfig", "SSLHead", "SwinUNETR", "SwinUNETRConfig", "build_ssl_head", "build_swinunetr"]
