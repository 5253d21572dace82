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
from shared.checkpoint import describe_checkpoint, load_checkpoint, require_run_checkpoint, strip_prefix
from shared.errors import InputError

# keys we add that no official checkpoint holds; they keep their fresh initialisation when missing
NEW_KEYS = ("prompt_encoder.box_corner_embeddings.weight",)
KINDS = ("sam_med3d", "sam_med3d_expert", "sam_med3d_moe")  # run checkpoints: general model, expert, MoE


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
        checkpoint: a plain state_dict written by `convert_checkpoint`, or a run checkpoint of this package (its
            own architecture; the general model of an MoE run); read with weights_only=True.
        cfg: architecture of a plain state_dict or of the random model; default `SamConfig()` = vit_b_ori.
    Returns:
        The model on the CPU.
    """
    cfg = cfg or SamConfig()
    model = build_model(cfg) if checkpoint is None else load_sam(checkpoint, cfg)[0]
    return model.eval()


def general_box_trained(ckpt: dict) -> bool:
    """Whether the general decoder of a run checkpoint was trained together with its box-corner embeddings.

    Runs record it ("box_trained": a bool for a single model, {"general": bool, "experts": [bool]} for the MoE);
    a checkpoint without the record is taken as untrained, never assumed trained.
    """
    record = ckpt.get("box_trained", False)
    return bool(record["general"] if isinstance(record, dict) else record)


def load_sam(path, plain_cfg: SamConfig) -> tuple[SamMed3D, dict]:
    """A SAM-Med3D from a run of this package (its general model, for an MoE run) or from a plain state_dict
    (official weights converted by `convert_checkpoint`), whose architecture `plain_cfg` names.

    Returns:
        the model and info {"kind", "box_trained"}. A plain state_dict never counts as box-trained: official
        SAM-Med3D has no box embeddings; with `plain_cfg.box_prompts` they are freshly initialised here (from the
        global RNG, which every entry point seeds).
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.get("kind") is not None:  # a run: of this package, else refused by name
        require_run_checkpoint(ckpt, path, kind=KINDS, keys=("model", "config"))
        cfg = config_from_dict(ckpt["config"]["sam"])
        weights = ckpt["model"]
        if ckpt["kind"] == "sam_med3d_moe":
            weights = {k[len("sam.") :]: v for k, v in weights.items() if k.startswith("sam.")}
        model = build_model(cfg)
        load_weights(model, weights, source=str(path), allow_new=False)
        return model, {"kind": ckpt["kind"], "box_trained": general_box_trained(ckpt)}
    if not ckpt or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise InputError(f"{path} is {describe_checkpoint(ckpt)}: pass a run checkpoint of this package or a "
                         "state_dict written by python -m sam_med3d_moe.convert_checkpoint.")  # fmt: skip
    model = build_model(plain_cfg)
    load_weights(model, ckpt, source=str(path), allow_new=True)
    return model, {"kind": "state_dict", "box_trained": False}


def config_from_dict(values: dict) -> SamConfig:
    """SamConfig from `dataclasses.asdict` output (lists back to tuples)."""
    names = {f.name for f in dataclasses.fields(SamConfig)}
    return SamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})
