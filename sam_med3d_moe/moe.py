"""SAM-Med3D-MoE (paper Fig. 2): shared frozen image and prompt encoders, the general expert (the original mask
decoder), task-specific experts (fine-tuned copies of it), the gating network and the mask selector."""

import copy

import torch
from torch import nn

from sam_med3d_moe.config import GateConfig
from sam_med3d_moe.gate import GatingNetwork
from sam_med3d_moe.mask_decoder import MaskDecoder3D
from sam_med3d_moe.model import SamMed3D
from sam_med3d_moe.selector import select, top_expert, uses_expert


class SamMed3DMoE(nn.Module):
    """`sam` (encoders + general decoder), `experts` (one MaskDecoder3D per task of `gate_cfg.tasks`) and `gate`.

    Box prompts: each decoder keeps the box-corner embeddings it was trained with. The general decoder (and the
    gate) use `sam.prompt_encoder`'s; expert k uses `expert_boxes[k]` (copied from its fine-tuning run, where
    they may have been trained with it). Points and masks share the one prompt encoder, frozen for all.
    """

    def __init__(self, sam: SamMed3D, experts: list[MaskDecoder3D], gate_cfg: GateConfig) -> None:
        super().__init__()
        if len(experts) != len(gate_cfg.tasks):
            raise ValueError(f"{len(experts)} expert decoders for {len(gate_cfg.tasks)} tasks {gate_cfg.tasks}")
        if gate_cfg.dim != sam.cfg.prompt_dim:
            raise ValueError(f"gate width {gate_cfg.dim} differs from the prompt width {sam.cfg.prompt_dim}")
        self.sam = sam
        self.experts = nn.ModuleList(experts)
        own = sam.prompt_encoder.box_corner_embeddings
        self.expert_boxes = nn.ModuleList(copy.deepcopy(own) for _ in experts) if own is not None else None
        self.gate = GatingNetwork(gate_cfg)
        self.gate_cfg = gate_cfg

    def step(
        self,
        image_embeddings: torch.Tensor,
        points=None,
        boxes=None,
        masks=None,
        mode: str | None = None,
        tau: float | None = None,
    ) -> dict:
        """One interactive step of the MoE on cached image embeddings.

        Args:
            image_embeddings: (B, C, g, g, g).
            points, boxes, masks: prompts as `PromptEncoder3D.forward`.
            mode, tau: selector override (default: the config's).
        Returns:
            dict with "fused" (B, 1, 4g, 4g, 4g) logits M_o, "general" M_g, "top" M_top, "logits" (B, m) gate
            logits, "scores" their softmax, "top_index" (B,) the chosen (top-1) specific expert, "uses_expert" (B,)
            bool whether M_o reads M_top (s_top > tau and a mode other than "general").
        The gate re-decides at every step from that step's prompt tokens only (in the interaction: the newest
        click, or the box), not from the earlier clicks.
        """
        sam = self.sam
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
        pe = sam.prompt_encoder.get_dense_pe()

        def run(decoder, k=None):
            tokens = sparse
            if boxes is not None and k is not None:  # expert k reads the box through its own corner embeddings
                tokens, _ = sam.prompt_encoder(points=points, boxes=boxes, box_corners=self.expert_boxes[k].weight)
            low_res, _ = decoder(
                image_embeddings=image_embeddings,
                image_pe=pe,
                sparse_prompt_embeddings=tokens,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            return low_res

        general = run(sam.mask_decoder)
        logits = self.gate(image_embeddings, pe, sparse)
        scores = logits.softmax(dim=-1)
        _, index = top_expert(scores)
        if len(self.experts) == 1:
            top = run(self.experts[0], 0)
        else:  # each sample gets its own top-1 expert; only that one receives a gradient
            outs = torch.stack([run(e, k) for k, e in enumerate(self.experts)], dim=0)  # (K, B, 1, s, s, s)
            top = outs[index, torch.arange(index.shape[0], device=index.device)]
        mode, tau = mode or self.gate_cfg.selector, self.gate_cfg.tau if tau is None else tau
        fused = select(general, top, scores, mode=mode, tau=tau)
        return {"fused": fused, "general": general, "top": top, "logits": logits, "scores": scores, "top_index": index,
                "uses_expert": uses_expert(scores, mode, tau)}  # fmt: skip


def expert_from(sam: SamMed3D) -> MaskDecoder3D:
    """A new task expert: a deep copy of the general mask decoder (fine-tuned afterwards)."""
    return copy.deepcopy(sam.mask_decoder)
