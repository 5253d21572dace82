"""Weight transfer between the stages: Stage 1 -> Stage 2 (SSL) -> Stage 3 (fine-tuning), with channel adaptation.

Only the Swin encoder (`swinViT.*`) moves between stages; SSL heads and the segmentation decoder start fresh.
The patch embedding is adapted to the new input channels (`--channel-transfer`):
- "name" (default): a new channel whose modality was an input of the source copies that input's filter;
  dropping channels (ATLAS: T1 only) and expanding them (UKB T1 + FLAIR -> BraTS' four) are this matching;
- "position": channel i copies the source's filter i, whatever the names (the channel counts must match).
  The modality-restriction recipe (paper Table 5, the same data in both channels "without requiring any
  modifications to the network structure") uses it: `--channels T1 T1` from a T1 + FLAIR encoder keeps both
  Stage-1 filters, where "name" would copy the T1 filter twice and drop the FLAIR one.
Channels without a source filter are initialised (BrainSegFounder Sec. 1.3):
- "kaiming" (paper text): Kaiming-normal init (fan_out, ReLU) of the new channels, the others copied;
- "default" (official code): the whole patch embedding keeps PyTorch's default init, nothing is copied.
"""

import torch
from torch import nn

from shared.checkpoint import strip_prefix
from shared.errors import InputError

PATCH_EMBED = ("patch_embed.proj.weight", "patch_embed.proj.bias")


def encoder_weights(state_dict: dict, source: str) -> dict:
    """The Swin-encoder entries of a state dict, keys relative to the encoder (`patch_embed.*`, `layers1.*`...).

    Accepts our checkpoints and foreign ones: a DDP `module.` prefix is stripped; keys under `swinViT.`
    (SwinUNETR, SSLHead) are taken, else bare encoder keys (Swin-UNETR's `model_swinvit.pt`).
    """
    state = strip_prefix(state_dict, "module.")
    encoder = {k[len("swinViT.") :]: v for k, v in state.items() if k.startswith("swinViT.")}
    if not encoder:
        encoder = {k: v for k, v in state.items() if k.startswith(("patch_embed.", "layers"))}
    if not encoder:
        raise InputError(f"{source}: no Swin encoder weights found (no 'swinViT.*' or 'layers*' keys).")
    return encoder


def match_channels(new_channels, old_channels) -> list:
    """For each new channel, the index of the source channel of the same modality, or None.

    A modality repeated in the new list pairs with its repeats in the source in order, then with its last
    occurrence (so `T1 T1` <- `T1 T1` copies position by position and `T1 T1` <- `T1 FLAIR` copies T1 twice).
    """
    used: dict = {}
    mapping = []
    for name in new_channels:
        hits = [i for i, old in enumerate(old_channels) if old == name]
        if not hits:
            mapping.append(None)
            continue
        mapping.append(hits[min(used.get(name, 0), len(hits) - 1)])
        used[name] = used.get(name, 0) + 1
    return mapping


def match_positions(new_channels, old_channels, source: str = "the source") -> list:
    """Channel i <- source channel i (`--channel-transfer position`); refused when the counts differ."""
    if len(new_channels) != len(old_channels):
        raise InputError(f"--channel-transfer position: {source} has {len(old_channels)} input channel(s) "
                         f"({' '.join(old_channels)}) but {len(new_channels)} are asked for "
                         f"({' '.join(new_channels)}); use --channel-transfer name.")  # fmt: skip
    return list(range(len(new_channels)))


def adapt_patch_embed(weight: torch.Tensor, bias: torch.Tensor, mapping, init: str, fresh: nn.Conv3d):
    """Patch-embedding weights for new input channels.

    Args:
        weight: (E, C_old, 2, 2, 2) source filter; bias: (E,).
        mapping: per new channel, a source channel index or None (`match_channels`).
        init: "kaiming" (copy mapped channels, Kaiming-init the rest, keep the source bias) or "default"
            (return the default-initialised `fresh` conv's weights, as the official code).
        fresh: a default-initialised Conv3d(C_new, E, 2, stride 2), the target's own patch embedding.
    Returns:
        (weight (E, C_new, 2, 2, 2), bias (E,)).
    """
    if init == "default":
        return fresh.weight.detach().clone(), fresh.bias.detach().clone()
    if init != "kaiming":
        raise ValueError(f"init must be 'kaiming' or 'default', got {init!r}.")
    new = torch.empty((weight.shape[0], len(mapping), *weight.shape[2:]), dtype=weight.dtype)
    nn.init.kaiming_normal_(new, mode="fan_out", nonlinearity="relu")
    for c, src in enumerate(mapping):
        if src is not None:
            new[:, c] = weight[:, src]
    return new, bias.detach().clone()


def transfer_encoder(encoder: nn.Module, source_state: dict, source_channels, target_channels, *, init: str,
                     source: str, by: str = "name") -> dict:  # fmt: skip
    """Load a source encoder into `encoder` (a `SwinEncoder`), adapting the patch embedding to new channels.

    Every non-embedding key must exist in the target with the same shape (checked per key).

    Args:
        encoder: target encoder (its patch embedding has len(target_channels) inputs).
        source_state: any state dict holding a Swin encoder (`encoder_weights`).
        source_channels, target_channels: modality names of the source and target input channels.
        init: "kaiming" or "default", see the module docstring.
        source: file name for messages.
        by: "name" (`match_channels`) or "position" (`match_positions`), see the module docstring.
    Returns:
        report {"moved": [...], "adapted": [...], "dropped": [...], "by": by}: encoder keys loaded as they are,
        one "target <- source" line per input channel, and source keys left behind (heads, decoder).
    """
    weights = encoder_weights(source_state, source)
    own = encoder.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
                  if k in own and k not in PATCH_EMBED and v.shape != own[k].shape]  # fmt: skip
    missing = [k for k in own if k not in weights and k not in PATCH_EMBED]
    if mismatched or missing:
        raise InputError(f"{source}: encoder does not fit the model (mismatched: {mismatched[:3]}, missing: "
                         f"{missing[:3]}); check --size/--feature-size.")  # fmt: skip
    if weights[PATCH_EMBED[0]].shape[1] != len(source_channels):
        raise InputError(f"{source}: patch embedding has {weights[PATCH_EMBED[0]].shape[1]} input channels but "
                         f"{len(source_channels)} source channels are named ({list(source_channels)}).")  # fmt: skip
    if by not in ("name", "position"):
        raise ValueError(f"by must be 'name' or 'position', got {by!r}.")
    if by == "name":
        mapping = match_channels(target_channels, source_channels)
    else:
        mapping = match_positions(target_channels, source_channels, source)
    fresh = encoder.patch_embed.proj
    w, b = adapt_patch_embed(weights[PATCH_EMBED[0]], weights[PATCH_EMBED[1]], mapping, init, fresh)
    new_state = {k: v for k, v in weights.items() if k in own}
    new_state.update({PATCH_EMBED[0]: w, PATCH_EMBED[1]: b})
    encoder.load_state_dict(new_state, strict=True)
    dropped = sorted(k for k in strip_prefix(source_state, "module.") if not k.startswith("swinViT."))
    adapted = [f"{name} <- {source_channels[src] + (f' (input {src})' if by == 'position' else '')}"
               if src is not None and init == "kaiming" else f"{name} <- new ({init} init)"
               for name, src in zip(target_channels, mapping)]  # fmt: skip
    moved = sorted(k for k in new_state if k not in PATCH_EMBED)
    return {"moved": moved, "adapted": adapted, "dropped": dropped, "by": by}


def describe_transfer(report: dict) -> str:
    """One short paragraph for the log: how many keys moved, the channel map, what stayed behind."""
    heads = sorted({k.split(".")[0] for k in report["dropped"]})
    channels = ", ".join(report["adapted"])
    return (f"encoder transfer: {len(report['moved'])} encoder keys moved; patch embedding by "
            f"{report.get('by', 'name')}: {channels}; "
            f"left behind: {len(report['dropped'])} keys of {heads or 'nothing'}")  # fmt: skip
