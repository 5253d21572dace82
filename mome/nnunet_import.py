"""Import nnU-Net v2 PlainConvUNet checkpoints (pretrained experts, official MoME release) into `PlainUNet`.

An nnU-Net checkpoint is a dict whose `network_weights` holds the state_dict. That state_dict lists every tensor
under several aliases: `.conv.*` = `.all_modules.0.*`, `.norm.*` = `.all_modules.{1,2}.*` and `decoder.encoder.*` =
`encoder.*` (292 keys for 108 tensors in a 6-stage net); `torch.compile` and DDP add `_orig_mod.` / `module.`.
`plain_state_dict` folds them onto the single names that `PlainUNet` uses, checking that aliases agree.
"""

import re

import torch
from torch import nn

from mome.expert import PlainUNet
from mome.gate import HierarchicalGate
from mome.model import MoME
from shared.checkpoint import load_foreign_checkpoint
from shared.errors import InputError

_STAGE_CONV = re.compile(r"^encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.conv\.weight$")
_DECODER_CONV = re.compile(r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.conv\.weight$")


def read_nnunet_file(path, *, trust_pickle: bool = False) -> dict:
    """Read a whole nnU-Net v2 checkpoint dict (`network_weights`, `init_args`, `logging`, ...).

    Read by `shared.checkpoint.load_foreign_checkpoint`: with `torch.load(weights_only=True)` and numpy scalars and
    dtypes allowed (nnU-Net stores numpy floats in `logging` and `_best_ema`). Anything else that the file pickles
    is refused unless `trust_pickle` (the `--trust-pickle` flag), which then reads it with `weights_only=False`:
    that runs the file's pickle code, so only for files whose origin you trust.
    """
    ckpt = load_foreign_checkpoint(path, trust_pickle=trust_pickle, flag="nnU-Net checkpoint")
    if not isinstance(ckpt, dict):
        raise InputError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected an nnU-Net checkpoint dict")
    if isinstance(ckpt.get("kind"), str):  # written by shared.checkpoint.save_checkpoint
        raise InputError(f"checkpoint {path} is a {ckpt['kind']} checkpoint of this project, not an nnU-Net one; "
                         "mome's own checkpoints need no conversion.")  # fmt: skip
    return ckpt


def read_nnunet_checkpoint(path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict under `network_weights` of an nnU-Net v2 checkpoint (see `read_nnunet_file`).

    A bare state_dict (no `network_weights` key) is accepted too.

    Returns:
        the raw state_dict (aliases and prefixes untouched).
    """
    ckpt = read_nnunet_file(path, trust_pickle=trust_pickle)
    weights = ckpt.get("network_weights", ckpt)
    if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(v) for v in weights.values()):
        raise InputError(f"checkpoint {path} has no tensor state_dict under 'network_weights'")
    return weights


def plain_state_dict(weights: dict[str, torch.Tensor], *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map an nnU-Net PlainConvUNet state_dict onto `PlainUNet` key names.

    Strips `module.` / `_orig_mod.`, maps `all_modules.0` -> `conv`, `all_modules.{1,2}` -> `norm` and
    `decoder.encoder.` -> `encoder.`, and raises InputError if two aliases of one tensor differ.
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in weights.items():
        name = key.replace("_orig_mod.", "")
        while name.startswith("module."):
            name = name[len("module.") :]
        if name.startswith("decoder.encoder."):
            name = name[len("decoder.") :]
        # all_modules is (conv, [dropout], norm, nonlin); only conv and norm carry tensors
        name = re.sub(r"\.all_modules\.0\.", ".conv.", name)
        name = re.sub(r"\.all_modules\.[12]\.", ".norm.", name)
        if name in out:
            if out[name].shape != value.shape or not torch.equal(out[name], value):
                raise InputError(f"{source}: aliases {origin[name]} and {key} of one tensor hold different values")
            continue
        out[name], origin[name] = value, key
    return out


def infer_unet_arch(weights: dict[str, torch.Tensor], *, source: str = "checkpoint") -> dict:
    """Infer PlainUNet constructor arguments from a `plain_state_dict` (shapes only).

    Widths, kernels, input channels, classes and conv counts are read from conv weights; the stride of stage
    s > 0 equals the kernel of the transposed conv that undoes it. Not stored in weights and assumed as in
    nnU-Net 3d_fullres: stage-0 stride 1, InstanceNorm, LeakyReLU(0.01), conv -> norm -> nonlin order.
    """
    stage_convs: dict[int, int] = {}
    decoder_convs: dict[int, int] = {}
    for key in weights:
        if m := _STAGE_CONV.match(key):
            stage_convs[int(m[1])] = max(stage_convs.get(int(m[1]), 0), int(m[2]) + 1)
        elif m := _DECODER_CONV.match(key):
            decoder_convs[int(m[1])] = max(decoder_convs.get(int(m[1]), 0), int(m[2]) + 1)
    n_stages = len(stage_convs)
    if n_stages < 2 or sorted(stage_convs) != list(range(n_stages)):
        raise InputError(f"{source} is not an nnU-Net PlainConvUNet (no encoder.stages.<s>.0.convs.<i>.conv keys)")
    if any(k.endswith("running_mean") for k in weights):
        raise InputError(f"{source} uses BatchNorm; only InstanceNorm PlainConvUNets can be imported")
    first = weights["encoder.stages.0.0.convs.0.conv.weight"]
    if first.ndim != 5:
        raise InputError(f"{source} holds a {first.ndim - 2}D network; only 3D networks can be imported")
    if sorted(decoder_convs) != list(range(n_stages - 1)):
        raise InputError(f"{source} has decoder stages {sorted(decoder_convs)}, expected 0..{n_stages - 2}")
    try:
        strides = [(1, 1, 1)] + [
            tuple(weights[f"decoder.transpconvs.{n_stages - 1 - s}.weight"].shape[2:]) for s in range(1, n_stages)
        ]
        num_classes = weights["decoder.seg_layers.0.weight"].shape[0]
    except KeyError as err:
        raise InputError(f"{source} lacks the PlainConvUNet key {err.args[0]}") from err
    stage_w = [weights[f"encoder.stages.{s}.0.convs.0.conv.weight"] for s in range(n_stages)]
    return dict(
        in_channels=first.shape[1],
        num_classes=num_classes,
        features=tuple(w.shape[0] for w in stage_w),
        kernel_sizes=[tuple(w.shape[2:]) for w in stage_w],
        strides=strides,
        n_conv_per_stage=[stage_convs[s] for s in range(n_stages)],
        n_conv_per_stage_decoder=[decoder_convs[j] for j in range(n_stages - 1)],
        conv_bias="encoder.stages.0.0.convs.0.conv.bias" in weights,
    )


def to_nnunet_state_dict(net: PlainUNet) -> dict[str, torch.Tensor]:
    """Export a PlainUNet state_dict with all of nnU-Net's aliases, loadable by PlainConvUNet with strict=True."""
    out = {}
    for key, value in net.state_dict().items():
        names = [key]
        if key.startswith("encoder."):
            names.append("decoder." + key)
        for name in list(names):
            names.append(name.replace(".conv.", ".all_modules.0.").replace(".norm.", ".all_modules.1."))
        out.update(dict.fromkeys(names, value))  # aliases share one tensor, as in nnU-Net's own state_dict
    return out


def load_checked(module: nn.Module, weights: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """`module.load_state_dict(weights, strict=True)` after a key-set and per-key shape check with clear errors."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise InputError(
            f"{source} does not fit the network: {len(missing)} missing keys {missing[:3]} and "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    for key, value in own.items():
        if value.shape != weights[key].shape:
            raise InputError(
                f"{source}: {key} has shape {tuple(weights[key].shape)} but the network expects {tuple(value.shape)}"
            )
    module.load_state_dict(weights, strict=True)


def load_nnunet_expert(path, *, deep_supervision: bool = True, trust_pickle: bool = False) -> PlainUNet:
    """Build a PlainUNet from an nnU-Net v2 PlainConvUNet checkpoint, its topology inferred from the weights.

    Args:
        path: nnU-Net checkpoint file (e.g. `fold_0/checkpoint_best.pth`) or a bare state_dict file.
        deep_supervision: forward returns all levels (highest resolution first) or only full-resolution logits.
        trust_pickle: see `read_nnunet_file`.

    Returns:
        the network in eval mode on the CPU.
    """
    weights = plain_state_dict(read_nnunet_checkpoint(path, trust_pickle=trust_pickle), source=str(path))
    net = PlainUNet(**infer_unet_arch(weights, source=str(path)), deep_supervision=deep_supervision)
    load_checked(net, weights, source=str(path))
    return net.eval()


def load_nnunet_mome(
    gate_path, expert_paths, *, gate_norm: str = "none", deep_supervision: bool = True, trust_pickle: bool = False
) -> MoME:
    """Assemble a MoME model from the official release: a gate checkpoint and one checkpoint per expert.

    Args:
        gate_path: the gate's nnU-Net checkpoint (e.g. `fold_MoME/checkpoint_best.pth`, 161 in -> 10 out).
        expert_paths: expert checkpoints in the official order T1, T1ce, T2, FLAIR, DWI (`checkpoint_best1..5`).
        gate_norm: "none" reproduces the official model.
        deep_supervision: as in `MoME`.
        trust_pickle: see `read_nnunet_file`.

    Returns:
        MoME in eval mode on the CPU (`python -m mome.convert_checkpoint` saves it as one checkpoint).
    """
    experts = nn.ModuleList(
        load_nnunet_expert(p, deep_supervision=deep_supervision, trust_pickle=trust_pickle) for p in expert_paths
    )
    arch = experts[0].arch
    for path, expert in zip(expert_paths, experts):
        if expert.arch != arch:
            raise InputError(f"expert checkpoint {path} has a different topology from {expert_paths[0]}")
    n, k, f0 = len(experts), arch["num_classes"], arch["features"][0]
    gate_unet = load_nnunet_expert(gate_path, trust_pickle=trust_pickle)
    if gate_unet.arch["in_channels"] != arch["in_channels"] + n * f0:
        raise InputError(
            f"gate checkpoint {gate_path} takes {gate_unet.arch['in_channels']} input channels, expected image + "
            f"{n} experts x {f0} features = {arch['in_channels'] + n * f0}"
        )
    if gate_unet.arch["num_classes"] != n * k or gate_unet.strides != experts[0].strides:
        raise InputError(f"gate checkpoint {gate_path} does not match {n} experts with {k} classes and their strides")
    gate = HierarchicalGate(unet=gate_unet, num_experts=n, num_classes=k, mode="hierarchical", norm=gate_norm)
    return MoME(experts=experts, gate=gate, deep_supervision=deep_supervision).eval()
