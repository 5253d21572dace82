"""The mask selector of SAM-Med3D-MoE (paper Sec. 2.3, Fig. 3) and the Table 2 ablation variants.

All functions fuse low-resolution mask *logits* (the paper writes M for "mask"; fusing logits keeps the result
usable as the next click's mask prompt, and sigmoid(.) > 0.5 of it is the prediction).
"""

import torch

from sam_med3d_moe.config import SELECTOR_MODES


def top_expert(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first-ranked *specific* expert of each sample.

    Args:
        scores: (B, m) softmax output of the gate; column 0 is the general expert.
    Returns:
        s_top: (B,) its score; index: (B,) its position among the specific experts (0-based).
    """
    s_top, index = scores[:, 1:].max(dim=1)
    return s_top, index


def uses_expert(scores: torch.Tensor, mode: str, tau: float) -> torch.Tensor:
    """Whether the selector's output of each sample reads the top-1 specific expert's mask: s_top > tau, and never
    in mode "general" (M_g only).

    Args:
        scores: (B, m) gate softmax, column 0 the general expert.
    Returns:
        (B,) bool.
    """
    s_top, _ = top_expert(scores)
    if mode == "general":
        return torch.zeros_like(s_top, dtype=torch.bool)
    return s_top > tau


def mask_selector(m_general: torch.Tensor, m_top: torch.Tensor, s_top: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """SAM-Med3D-MoE Eq. (Sec. 2.3): M_o = (1 - s_top) M_g + s_top M_top if s_top > tau, else M_g.

    Args:
        m_general: (B, ...) general-expert logits M_g.
        m_top: (B, ...) logits of the first-ranked specific expert M_top.
        s_top: (B,) its gate score.
        tau: threshold (paper default 0.5; Table 2 also 0.7).
    Returns:
        (B, ...) fused logits M_o.
    """
    s = s_top.reshape(-1, *([1] * (m_general.dim() - 1))).to(m_general.dtype)
    fused = (1 - s) * m_general + s * m_top
    return torch.where(s > tau, fused, m_general)


def average_selector(m_general, m_top, s_top, tau: float = 0.5) -> torch.Tensor:
    """Table 2 "Avg": the arithmetic mean (M_g + M_top) / 2 instead of the s_top-weighted sum when s_top > tau."""
    s = s_top.reshape(-1, *([1] * (m_general.dim() - 1)))
    return torch.where(s > tau, (m_general + m_top) / 2, m_general)


def aft_weight_selector(m_general, m_top, s_top, s_general, tau: float = 0.5) -> torch.Tensor:
    """Table 2 "Aft_weight": weights from a softmax over the two experts' gate scores (s_g, s_top), i.e.
    w_top = e^s_top / (e^s_g + e^s_top), instead of s_top itself, when s_top > tau.

    The paper gives one sentence for this variant ("softmax-fused outputs"); this reading (softmax re-normalisation
    of the pair of scores) is ours. w_top = sigmoid(s_top - s_g) <= sigmoid(1) = 0.731 always, and with tau >= 0.5
    (so s_top - s_g in (0, 1]) w_top lies in (0.5, 0.731]: a mild re-weighting, whatever the gate's confidence.
    The alternative reading, a per-voxel softmax over the two decoders' output logits, is not
    implemented.
    """
    pair = torch.stack([s_general, s_top], dim=1).softmax(dim=1)  # (B, 2)
    shape = (-1, *([1] * (m_general.dim() - 1)))
    w_g, w_top, s = pair[:, 0].reshape(shape), pair[:, 1].reshape(shape), s_top.reshape(shape)
    return torch.where(s > tau, w_g * m_general + w_top * m_top, m_general)


def select(m_general, m_top, scores: torch.Tensor, mode: str = "weighted", tau: float = 0.5) -> torch.Tensor:
    """Fuse with one of SELECTOR_MODES: "weighted" (paper), "avg", "aft_weight" (Table 2), "general" (M_g only,
    the baseline) or "top1" (M_top when s_top > tau, no fusion).

    Args:
        m_general, m_top: (B, ...) logits; scores: (B, m) gate softmax, column 0 the general expert.
    Returns:
        (B, ...) logits.
    """
    s_top, _ = top_expert(scores)
    if mode == "weighted":
        return mask_selector(m_general, m_top, s_top, tau=tau)
    if mode == "avg":
        return average_selector(m_general, m_top, s_top, tau=tau)
    if mode == "aft_weight":
        return aft_weight_selector(m_general, m_top, s_top, scores[:, 0], tau=tau)
    if mode == "general":
        return m_general
    if mode == "top1":
        s = s_top.reshape(-1, *([1] * (m_general.dim() - 1)))
        return torch.where(s > tau, m_top, m_general)
    raise ValueError(f"selector mode must be one of {SELECTOR_MODES}, got {mode!r}")
