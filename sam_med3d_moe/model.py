"""SAM-Med3D assembled from its three boxes, and loading of weights (official or ours) with a per-key check.

`build_sam_med3d()` gives the official default model `vit_b_ori` (turbo) with identical state_dict keys and
shapes; its submodules take the official call arguments. Official checkpoint *files* pickle extra objects
(argparse Namespace, ...) and must first be turned into a plain state_dict once with
`python -m sam_med3d_moe.convert_checkpoint --trust-pickle`; everything else loads with weights_only=True.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from sam_med3d_moe.config import SamConfig
from sam_med3d_moe.image_encoder import ImageEncoderViT3D
from sam_med3d_moe.mask_decoder import MaskDecoder3D
from sam_med3d_moe.prompt_encoder import PromptEncoder3D
from shared.checkpoint import load_checkpoint, strip_prefix
from shared.errors import InputError

# keys we add that no official checkpoint holds; they keep their fresh initialisation when missing
NEW_KEYS = ("prompt_encoder.box_corner_embeddings.weight",)


class SamMed3D(nn.Module):
    """SAM-Med3D: image encoder, prompt encoder and mask decoder, built outside and passed in."""

    def __init__(
        self,
        image_encoder: ImageEncoderViT3D,
        prompt_encoder: PromptEncoder3D,
        mask_decoder: MaskDecoder3D,
        cfg: SamConfig,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.cfg = cfg

    def decode(self, image_embeddings, points=None, boxes=None, masks=None, decoder=None):
        """One interactive step on cached image embeddings.

        Args:
            image_embeddings: (B, C, g, g, g) from `image_encoder`.
            points: (coords (B, N, 3), labels (B, N)) or None; boxes: (B, 6) or None.
            masks: (B, 1, 4g, 4g, 4g) previous low-res logits or None.
            decoder: a mask decoder to use instead of `mask_decoder` (a task expert).
        Returns:
            low-res logits (B, 1, 4g, 4g, 4g).
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        low_res, _ = (decoder or self.mask_decoder)(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return low_res

    def forward(self, image, points=None, boxes=None, masks=None) -> torch.Tensor:
        """Args: image (B, 1, I, I, I); prompts as `decode`. Returns: full-size logits (B, 1, I, I, I)."""
        return upsample(self.decode(self.image_encoder(image), points=points, boxes=boxes, masks=masks), self.cfg)


def upsample(low_res: torch.Tensor, cfg: SamConfig) -> torch.Tensor:
    """Low-res logits (B, 1, 4g, 4g, 4g) -> (B, 1, I, I, I), trilinear with align_corners=False (official)."""
    return F.interpolate(low_res, size=(cfg.image_size,) * 3, mode="trilinear", align_corners=False)


def build_model(cfg: SamConfig) -> SamMed3D:
    """A randomly initialised SAM-Med3D of architecture `cfg`."""
    return SamMed3D(ImageEncoderViT3D(cfg), PromptEncoder3D(cfg), MaskDecoder3D(cfg), cfg)


def load_weights(
    model: nn.Module, state_dict: dict, source: str, allow_new: bool = True, check_only: bool = False
) -> list[str]:
    """Copy `state_dict` into `model` key by key with a shape check (a DDP "module." prefix is stripped).

    Args:
        model: the target module.
        state_dict: name -> tensor.
        source: file or description, named in errors.
        allow_new: keys in NEW_KEYS may be absent (they keep their initialisation).
        check_only: only check keys and shapes (e.g. against a model on the meta device).
    Returns:
        The model keys that were not in `state_dict` (only NEW_KEYS when allow_new).
    Raises:
        InputError: a key is missing or unexpected, or a shape differs.
    """
    state_dict = strip_prefix(state_dict)
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(k for k in own if k not in state_dict)
    not_new = [k for k in missing if not (allow_new and k.endswith(NEW_KEYS))]
    if unexpected or not_new:
        raise InputError(
            f"{source}: weights do not fit this SAM-Med3D (missing {not_new[:3]}, unexpected "
            f"{unexpected[:3]}; {len(not_new)} missing and {len(unexpected)} unexpected in all)."
        )
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise InputError(
                f"{source}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}."
            )
    if not check_only:
        model.load_state_dict({**own, **state_dict}, strict=True)
    return missing


def build_sam_med3d(checkpoint=None, cfg: SamConfig | None = None) -> SamMed3D:
    """The official default SAM-Med3D `vit_b_ori` (or `cfg`), optionally with weights, in eval mode.

    Args:
        checkpoint: a plain state_dict written by `convert_checkpoint`, or a training checkpoint of this package
            (a dict with "model" and "config"); read with weights_only=True.
        cfg: architecture; default `SamConfig()` = vit_b_ori (a training checkpoint supplies its own config).
    Returns:
        The model on the CPU.
    """
    payload = None
    if checkpoint is not None:
        payload = load_checkpoint(checkpoint, map_location="cpu")
        if "model" in payload and "config" in payload:  # a run of this package: its general model
            cfg = config_from_dict(payload["config"]["sam"])
            weights = payload["model"]
            if payload.get("kind") == "sam_med3d_moe":
                weights = {k[len("sam.") :]: v for k, v in weights.items() if k.startswith("sam.")}
            payload = weights
    model = build_model(cfg or SamConfig())
    if payload is not None:
        load_weights(model, payload, source=str(checkpoint))
    return model.eval()


def config_from_dict(values: dict) -> SamConfig:
    """SamConfig from `dataclasses.asdict` output (lists back to tuples)."""
    names = {f.name for f in dataclasses.fields(SamConfig)}
    return SamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})
