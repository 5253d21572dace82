"""A trained model ready for prompts: SAM-Med3D (general model, task expert, converted official weights) or
SAM-Med3D-MoE, loaded from a checkpoint with its box-prompt record, stepping on cached image embeddings.
"""

import dataclasses

import torch

from sam_med3d_moe.config import GateConfig, config_by_name
from sam_med3d_moe.model import KINDS, build_model, config_from_dict, load_weights
from sam_med3d_moe.moe import SamMed3DMoE
from sam_med3d_moe.tasks import ExpertTask
from shared.checkpoint import describe_checkpoint, load_checkpoint, require_run_checkpoint
from shared.errors import InputError


class Predictor:
    """A loaded model ready for interactive steps: `embed(image)` once, then `step(emb, points=, boxes=, masks=)`.

    Args:
        path: a run checkpoint of this package (general, expert or MoE) or a converted official state_dict.
        device: torch device.
        config: architecture of a plain state_dict ("vit_b_ori" or "small").
        selector, tau: override the MoE's mask selector (Table 2 variants); ignored for single models.
        seed: seeds every fresh initialisation (the box-corner embeddings a plain state_dict lacks), so two runs
            of the same command give the same mask.
    """

    def __init__(
        self,
        path,
        device,
        config: str = "vit_b_ori",
        selector: str | None = None,
        tau: float | None = None,
        seed: int = 2023,
    ):
        ckpt = load_checkpoint(path, map_location="cpu")
        self.path = str(path)
        self.kind = ckpt.get("kind", "state_dict")
        if self.kind in KINDS or ckpt.get("kind") is not None:  # a run: of this package, else refused by name
            require_run_checkpoint(ckpt, path, kind=KINDS, keys=("model", "config"))
            cfg = config_from_dict(ckpt["config"]["sam"])
            weights = ckpt["model"]
        elif ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
            cfg, weights = config_by_name(config, box_prompts=True), ckpt
        else:
            raise InputError(f"{path} is {describe_checkpoint(ckpt)}: pass a run checkpoint of this package or a "
                             "state_dict written by python -m sam_med3d_moe.convert_checkpoint.")  # fmt: skip
        torch.manual_seed(seed)
        sam = build_model(cfg)
        self.moe = None
        self.expert_tasks = []  # the ExpertTask of each expert (MoE) or of the model (an expert run)
        if self.kind == "sam_med3d_moe":
            gate = dict(ckpt["config"]["gate"])
            gate.update({k: v for k, v in (("selector", selector), ("tau", tau)) if v is not None})
            names = {f.name for f in dataclasses.fields(GateConfig)}
            gate_cfg = GateConfig(**{k: v for k, v in gate.items() if k in names})
            self.moe = SamMed3DMoE(sam, [build_model(cfg).mask_decoder for _ in gate_cfg.tasks], gate_cfg)
            load_weights(self.moe, weights, source=str(path), allow_new=False)
            self.moe.to(device).eval()
            self.expert_tasks = [ExpertTask.from_dict(t) for t in ckpt["config"].get("expert_tasks", [])]
        else:
            load_weights(sam, weights, source=str(path), allow_new=self.kind not in KINDS)
            if "expert_task" in ckpt.get("config", {}):
                self.expert_tasks = [ExpertTask.from_dict(ckpt["config"]["expert_task"])]
        self.sam = sam.to(device).eval()
        self.cfg = cfg
        self.device = device
        self.untrained_box = self._untrained_box_decoders(ckpt)

    def _untrained_box_decoders(self, ckpt: dict) -> list[str]:
        """The decoders (of the ones a prompt may reach) whose box-corner embeddings were never trained."""
        if self.kind not in KINDS:
            return ["all: a plain state_dict, and official SAM-Med3D has no box prompt"]
        record = ckpt.get("box_trained", False)
        if self.kind != "sam_med3d_moe":
            return [] if record is True else ["its decoder"]
        record = record if isinstance(record, dict) else {}
        names = [] if record.get("general") is True else ["the general decoder"]
        flags = record.get("experts", [])
        for k, task in enumerate(self.moe.gate_cfg.tasks):
            if k >= len(flags) or flags[k] is not True:
                names.append(f"expert {task}")
        return names

    def check_box(self, allow_untrained: bool, flag: str) -> None:
        """Refuse box prompts on box embeddings that never learned, unless `allow_untrained` (the `flag` given)."""
        if self.untrained_box and not allow_untrained:
            raise InputError(
                f"--box: {self.path} never trained its box embeddings ({'; '.join(self.untrained_box)}), so a box "
                f"prompt gives an arbitrary mask; train with --box-prob > 0 first, or pass {flag} to run it anyway."
            )

    @torch.no_grad()
    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, I, I, I) z-normalised crop -> (B, C, g, g, g) image embedding."""
        return self.sam.image_encoder(image.to(self.device))

    @torch.no_grad()
    def step(self, emb: torch.Tensor, points=None, boxes=None, masks=None, routing: list | None = None) -> torch.Tensor:
        """One prompt step -> (B, 1, 4g, 4g, 4g) low-res logits (the MoE's fused M_o for an MoE).

        Args:
            routing: for an MoE, a list that receives the gate scores (B, m) of this step (a numpy array).
        """
        if self.moe is None:
            return self.sam.decode(emb, points=points, boxes=boxes, masks=masks)
        out = self.moe.step(emb, points=points, boxes=boxes, masks=masks)
        if routing is not None:
            routing.append(out["scores"].float().cpu().numpy())
        return out["fused"]

    def stepper(self, emb: torch.Tensor, routing: list | None = None):
        """The `step(points=, boxes=, masks=)` callable of the interaction protocols, on fixed embeddings."""

        def step(points=None, boxes=None, masks=None):
            return self.step(emb, points=points, boxes=boxes, masks=masks, routing=routing)

        return step
