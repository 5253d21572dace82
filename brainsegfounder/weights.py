"""Pretrained and fine-tuned SwinUNETR weights in the layouts in circulation: detected, renamed, described.

    weights = read_weights("model_swinvit.pt", flag="--init")    # any of the formats below
    print(describe_weights(weights, legacy_merging=True))

Formats (`Weights.format`):
- "run": a checkpoint written by `brainsegfounder.pretrain` / `finetune` (kind, config and channels recorded).
- "converted": a file written by `python -m brainsegfounder.convert_checkpoint` (the same, without a run).
- "tang_ssl": Swin-UNETR's self-supervised encoder (Tang et al. 2022, `model_swinvit.pt`): {"state_dict":
  {"module.patch_embed.*", "module.layersN.0.blocks.K.mlp.fc1.*", ...}}, the layout MONAI's
  `SwinUNETR.load_from` reads. Encoder only; `fc1/fc2` are our `linear1/linear2`; other keys (heads) ignored.
- "ssl_head": an SSLHead state dict (BrainSegFounder's released `model_weights_*-pretrain.pt`, Swin-UNETR
  pretraining runs): `swinViT.*` or `module.swinViT.*` plus the SSL heads, which are ignored.
- "swinunetr": a whole SwinUNETR state dict (MONAI, BrainSegFounder's fine-tuned `model.pt` with its
  {"epoch", "best_acc", "state_dict", ...}), which `predict` uses as it is.

The layout (feature size, depths, heads, window, input and output channels) is read off the tensor shapes.
Two things cannot be: the modality of each input channel (named by the caller) and the patch-merging order
(MONAI < 1.5 concatenates two cells twice; the released Tang and BrainSegFounder weights were trained so).
Files are read by `shared.checkpoint.load_foreign_checkpoint` (`weights_only=True`, numpy scalars allowed); a
pickled file is refused with the converter command that reads it once with `trust_pickle=True` (which runs code
from the file).
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared.checkpoint import load_foreign_checkpoint, strip_prefix
from shared.errors import InputError

RUN_KINDS = ("brainsegfounder_ssl", "brainsegfounder_seg")
CONVERTED_KIND = "brainsegfounder_weights"
FORMAT_NAMES = {
    "run": "a BrainSegFounder run checkpoint of this package",
    "converted": "weights converted by brainsegfounder.convert_checkpoint",
    "tang_ssl": "Swin-UNETR self-supervised encoder (Tang et al., model_swinvit.pt layout: module.*, fc1/fc2)",
    "ssl_head": "SSLHead state dict (BrainSegFounder / Swin-UNETR pretraining: swinViT.* and SSL heads)",
    "swinunetr": "whole SwinUNETR state dict (MONAI / BrainSegFounder fine-tuned model)",
}
TARGET_OF_CHANNELS = {3: "brats", 1: "binary"}  # sigmoid outputs: BraTS TC/WT/ET (BSF, MONAI) or one lesion
_STATE_KEYS = ("state_dict", "model", "model_state_dict", "net")  # where trainers put the weights
_WRAPPERS = ("module.", "_orig_mod.", "backbone.")  # DDP, torch.compile, BrainSegFounder's --checkpoint
_DECODER = re.compile(r"^(encoder\d+|decoder\d|out)\.")
_BLOCK = re.compile(r"^swinViT\.layers(\d)\.0\.blocks\.(\d+)\.")


@dataclass
class Weights:
    """SwinUNETR weights with our key names and what the shapes and the file say about them."""

    format: str  # one of FORMAT_NAMES
    state: dict  # `swinViT.*` (+ the decoder's keys for a whole SwinUNETR; SSL heads for our SSL runs)
    arch: dict  # feature_size, depths, num_heads, window_size (from the shapes)
    in_channels: int
    out_channels: int | None  # None: an encoder without a segmentation decoder
    channels: list | None = None  # input modalities when the file records them
    legacy_merging: bool | None = None  # recorded patch-merging order; None: the file cannot tell
    ignored: list = field(default_factory=list)  # keys of the file left out (SSL heads)
    meta: dict = field(default_factory=dict)  # recorded target, patch, brats_labels of a segmentation model
    path: str = ""


def _find_state(payload, path: Path, flag: str) -> dict:
    """The tensor dict inside a loaded file: a module's state_dict, a trainer's 'state_dict' / 'model', or the top."""
    if isinstance(payload, torch.nn.Module):
        return payload.state_dict()
    if isinstance(payload, dict):
        for key in _STATE_KEYS:
            inner = payload.get(key)
            if isinstance(inner, torch.nn.Module):
                return inner.state_dict()
            if isinstance(inner, dict) and inner and all(torch.is_tensor(v) for v in inner.values()):
                return inner
        tensors = {k: v for k, v in payload.items() if torch.is_tensor(v)}
        if tensors and len(tensors) == len(payload):
            return payload
    raise InputError(f"{flag} {path}: found no state dict of tensors (looked at {', '.join(_STATE_KEYS)} and the "
                     "top level).")  # fmt: skip


def _unwrap(state: dict) -> dict:
    """Strip wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`, BSF `backbone.`), as often as they nest."""
    while True:
        stripped = state
        for prefix in _WRAPPERS:
            if all(k.startswith(prefix) for k in stripped):
                stripped = strip_prefix(stripped, prefix)
        if stripped is state:
            return state
        state = stripped


def infer_layout(state: dict, flag: str) -> tuple[dict, int, int | None]:
    """(arch, in_channels, out_channels or None) of a state dict with our key names, from the tensor shapes.

    feature size and input channels from the patch embedding (E, C, 2, 2, 2); depths from the block indices of
    each stage; heads from each stage's bias table (T, heads); window w from T = (2w - 1)^3; output channels
    from the 1x1 output conv. Refuses layouts our SwinUNETR cannot build (use_v2, other MLP ratio, no qkv bias).
    """
    embed = state.get("swinViT.patch_embed.proj.weight")
    if embed is None or embed.ndim != 5 or tuple(embed.shape[2:]) != (2, 2, 2):
        raise InputError(f"{flag}: no 2x2x2 Swin patch embedding (swinViT.patch_embed.proj.weight) in the weights.")
    if any(k.startswith(f"swinViT.layers{i}c.") for k in state for i in range(1, 5)):
        raise InputError(f"{flag}: a SwinUNETR with use_v2=True (layers1c..4c) is not supported.")
    feature_size, in_channels = int(embed.shape[0]), int(embed.shape[1])
    depths, heads, windows = [], [], []
    for stage in range(1, 5):
        blocks = {int(m[2]) for k in state if (m := _BLOCK.match(k)) and int(m[1]) == stage}
        if not blocks or blocks != set(range(max(blocks) + 1)):
            raise InputError(f"{flag}: stage layers{stage} has blocks {sorted(blocks)}, expected 0..N-1.")
        depths.append(len(blocks))
        prefix = f"swinViT.layers{stage}.0.blocks.0."
        table = state[prefix + "attn.relative_position_bias_table"]
        side = round(table.shape[0] ** (1 / 3))
        if side**3 != table.shape[0] or side % 2 == 0:
            raise InputError(f"{flag}: bias table of layers{stage} has {table.shape[0]} rows, not (2w-1)^3.")
        heads.append(int(table.shape[1]))
        windows.append((side + 1) // 2)
        dim = feature_size * 2 ** (stage - 1)
        if state[prefix + "mlp.linear1.weight"].shape[0] != 4 * dim:
            raise InputError(f"{flag}: the MLP of layers{stage} is not 4x wide (mlp_ratio 4 is the only one built).")
        if prefix + "attn.qkv.bias" not in state:
            raise InputError(f"{flag}: the attention has no qkv bias (qkv_bias=False is not built).")
    if len(set(windows)) != 1:
        raise InputError(f"{flag}: the stages use different windows {windows}.")
    out = state.get("out.conv.conv.weight")
    arch = {"feature_size": feature_size, "depths": depths, "num_heads": heads, "window_size": windows[0]}
    return arch, in_channels, None if out is None else int(out.shape[0])


def _ours(payload: dict, path: Path, flag: str) -> Weights:
    fmt = "converted" if payload["kind"] == CONVERTED_KIND else "run"
    config = payload.get("config") or {}
    state = payload["model"]
    arch, in_channels, out_channels = infer_layout(state, f"{flag} {path}")
    meta = {k: payload[k] for k in ("target", "patch", "brats_labels") if payload.get(k) is not None}
    return Weights(format=fmt, state=state, arch=arch, in_channels=in_channels, out_channels=out_channels,
                   channels=list(payload["channels"]) if payload.get("channels") else None,
                   legacy_merging=config.get("legacy_merging", payload.get("legacy_merging")),
                   meta=meta, path=str(path))  # fmt: skip


def read_weights(path, flag: str = "--init", trust_pickle: bool = False) -> Weights:
    """Read SwinUNETR weights in any supported format (module docstring) with our key names.

    Args:
        path: the file.
        flag: the flag that named it, for messages.
        trust_pickle: unpickle arbitrary objects (runs code from the file; `convert_checkpoint --trust-pickle`).
    Raises:
        InputError: unreadable, pickled without `trust_pickle`, another package's checkpoint, no Swin encoder.
    """
    path = Path(path)
    payload = load_foreign_checkpoint(path, trust_pickle=trust_pickle, flag=flag, remedy="if you trust the file, "
                                      f"convert it once: python -m brainsegfounder.convert_checkpoint {path} --out "
                                      "PLAIN.pt --trust-pickle")  # fmt: skip
    if isinstance(payload, dict) and isinstance(payload.get("kind"), str):
        if payload["kind"] in (*RUN_KINDS, CONVERTED_KIND):
            return _ours(payload, path, flag)
        raise InputError(f"{flag} {path} is a {payload['kind']} checkpoint, not BrainSegFounder or SwinUNETR weights.")
    state = _unwrap(_find_state(payload, path, flag))
    if any(k.startswith("swinViT.") for k in state):
        decoder = any(_DECODER.match(k) for k in state)
        fmt = "swinunetr" if decoder else "ssl_head"
        keep = {k: v for k, v in state.items() if k.startswith("swinViT.") or (decoder and _DECODER.match(k))}
    elif any(k.startswith(("patch_embed.", "layers1.")) for k in state):
        fmt = "tang_ssl"
        keep = {f"swinViT.{k}": v for k, v in state.items() if k.startswith(("patch_embed.", "layers"))}
    else:
        raise InputError(f"{flag} {path}: no SwinUNETR encoder weights found (no swinViT.*, patch_embed.* or "
                         "layers* keys); pass a brainsegfounder run checkpoint, Swin-UNETR's model_swinvit.pt or a "
                         "SwinUNETR / SSLHead state dict.")  # fmt: skip
    kept = set(keep) if fmt != "tang_ssl" else {k[len("swinViT.") :] for k in keep}
    ignored = sorted(k for k in state if k not in kept)
    # Swin-UNETR's released encoder names the MLP layers fc1/fc2, MONAI's MLPBlock linear1/linear2
    keep = {re.sub(r"\.mlp\.fc([12])\.", r".mlp.linear\1.", k): v for k, v in keep.items()}
    arch, in_channels, out_channels = infer_layout(keep, f"{flag} {path}")
    return Weights(format=fmt, state=keep, arch=arch, in_channels=in_channels, out_channels=out_channels,
                   ignored=ignored, path=str(path))  # fmt: skip


def resolve_legacy_merging(weights: Weights, requested: bool | None, flag: str = "--init") -> tuple[bool, str]:
    """The patch-merging order to build for `weights`, and the report's sentence about it.

    Recorded (our files): that order; an explicit contrary flag is refused. Not recorded (foreign files): the
    flag, or by default MONAI < 1.5's order, which every released Tang / BrainSegFounder checkpoint was trained with.
    """
    if weights.legacy_merging is not None:
        if requested is not None and requested != weights.legacy_merging:
            recorded = "--legacy-merging" if weights.legacy_merging else "--no-legacy-merging"
            raise InputError(f"{flag} {weights.path} was built with {recorded}; drop the contrary flag.")
        order = "MONAI < 1.5 (legacy)" if weights.legacy_merging else "MONAI >= 1.5"
        return weights.legacy_merging, f"patch merging: {order} order, as recorded in the file"
    if requested is None:
        return True, ("patch merging: the file cannot tell; assumed the MONAI < 1.5 (legacy) order of the released "
                      "Tang and BrainSegFounder weights (pass --no-legacy-merging for weights trained with "
                      "MONAI >= 1.5)")  # fmt: skip
    order = "MONAI < 1.5 (legacy)" if requested else "MONAI >= 1.5"
    flag_name = "--legacy-merging" if requested else "--no-legacy-merging"
    return requested, f"patch merging: the file cannot tell; {order} order, as {flag_name} says"


def describe_weights(weights: Weights, merging_note: str) -> str:
    """A few report lines: detected format, layout read off the shapes, channels, ignored keys, merging order."""
    a = weights.arch
    part = "encoder + decoder" if weights.out_channels is not None else "encoder only"
    lines = [
        f"{weights.path}: {FORMAT_NAMES[weights.format]}",
        f"  layout from the weights: feature size {a['feature_size']}, depths {a['depths']}, heads {a['num_heads']}, "
        f"window {a['window_size']}, {weights.in_channels} input channel(s), {part}"
        + (f" with {weights.out_channels} output channel(s)" if weights.out_channels is not None else ""),
        "  input channels: "
        + (
            ", ".join(weights.channels)
            if weights.channels
            else "not recorded (name them with --init-channels / --channels)"
        ),  # fmt: skip
        f"  {merging_note}",
    ]
    if weights.ignored:
        groups = sorted({k.split(".")[0] for k in weights.ignored})
        lines.append(f"  ignored: {len(weights.ignored)} keys of {', '.join(groups)}")
    return "\n".join(lines)


def segmentation_target(weights: Weights, flag: str = "--model") -> str:
    """ "brats" (TC/WT/ET sigmoid channels) or "binary" (one lesion channel): recorded, else from the output width."""
    if weights.out_channels is None:
        raise InputError(f"{flag} {weights.path} holds an encoder only ({FORMAT_NAMES[weights.format]}); fine-tune it "
                         f"first: python -m brainsegfounder.finetune --init {weights.path} ...")  # fmt: skip
    target = weights.meta.get("target") or TARGET_OF_CHANNELS.get(weights.out_channels)
    if target is None:
        raise InputError(f"{flag} {weights.path}: {weights.out_channels} output channels; only 3 (BraTS TC/WT/ET "
                         "sigmoid channels) or 1 (one lesion) are supported.")  # fmt: skip
    return target


def load_model_state(model: torch.nn.Module, state: dict, flag: str) -> None:
    """`load_state_dict(strict=True)` after adding the `relative_position_index` buffers a file may leave out (they
    are a function of the window, not learned); any other missing or unexpected key is refused with its name."""
    own = model.state_dict()
    full = dict(state)
    full.update({k: v for k, v in own.items() if k.endswith("relative_position_index") and k not in state})
    missing, unexpected = sorted(set(own) - set(full)), sorted(set(full) - set(own))
    mismatched = [k for k in own if k in full and tuple(full[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise InputError(f"{flag}: the weights do not fit the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, other shape {mismatched[:3]}).")  # fmt: skip
    model.load_state_dict(full, strict=True)
