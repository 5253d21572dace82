"""Read what MoME inference needs from an nnU-Net v2 `plans.json`: the patch size and the UNet topology.

Two formats exist (../shared/reference/mome.md, 9.1): nnU-Net >= 2.4 stores the network as
`configurations[c]["architecture"] = {"network_class_name", "arch_kwargs": {...}}`; v2.2 (the version MoME forks)
stores `UNet_class_name`, `UNet_base_num_features`, `unet_max_num_features`, `n_conv_per_stage_encoder/decoder`,
`pool_op_kernel_sizes` and `conv_kernel_sizes` in the configuration itself. A configuration may inherit from
another (`inherits_from`), whose keys it overrides.
"""

from pathlib import Path

from shared.cli import read_json_file
from shared.errors import InputError


def _configuration(plans: dict, name: str, source: str) -> dict:
    """The configuration `name` with the keys it inherits (nnU-Net's `inherits_from`), its own keys winning."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or name not in configurations:
        found = sorted(configurations) if isinstance(configurations, dict) else []
        raise InputError(f"{source}: no configuration {name!r} in 'configurations' (found {found}).")
    conf, seen = dict(configurations[name]), {name}
    while "inherits_from" in conf:
        parent = conf.pop("inherits_from")
        if parent in seen or parent not in configurations:
            raise InputError(f"{source}: configuration {name!r} inherits from missing or circular {parent!r}.")
        seen.add(parent)
        conf = {**configurations[parent], **conf}
    return conf


def _arch_v24(arch: dict, source: str) -> dict:
    """PlainUNet topology from nnU-Net >= 2.4 `architecture` (network_class_name + arch_kwargs)."""
    name, kw = arch.get("network_class_name", ""), arch.get("arch_kwargs", {})
    if not name.endswith("PlainConvUNet"):
        raise InputError(f"{source}: the network is a {name}, expected a PlainConvUNet (MoME's experts and gate).")
    for key, expected in (("conv_op", "Conv3d"), ("norm_op", "InstanceNorm3d"), ("nonlin", "LeakyReLU")):
        if not str(kw.get(key, "")).endswith(expected):
            raise InputError(f"{source}: arch_kwargs {key} is {kw.get(key)!r}, expected torch.nn {expected}.")
    if kw.get("dropout_op") is not None:
        raise InputError(f"{source}: arch_kwargs uses dropout ({kw['dropout_op']}), which PlainUNet does not have.")
    return {
        "features": tuple(int(f) for f in kw["features_per_stage"]),
        "kernel_sizes": [tuple(int(k) for k in ks) for ks in kw["kernel_sizes"]],
        "strides": [tuple(int(s) for s in st) for st in kw["strides"]],
        "n_conv_per_stage": [int(n) for n in kw["n_conv_per_stage"]],
        "n_conv_per_stage_decoder": [int(n) for n in kw["n_conv_per_stage_decoder"]],
        "conv_bias": bool(kw.get("conv_bias", True)),
    }


def _arch_v22(conf: dict, source: str) -> dict:
    """PlainUNet topology from nnU-Net 2.2 plans keys (features double per stage from the base, capped)."""
    if conf.get("UNet_class_name", "PlainConvUNet") != "PlainConvUNet":
        raise InputError(f"{source}: UNet_class_name is {conf['UNet_class_name']!r}, expected PlainConvUNet.")
    kernels = conf["conv_kernel_sizes"]
    base, cap = int(conf["UNet_base_num_features"]), int(conf["unet_max_num_features"])
    return {
        "features": tuple(min(base * 2**s, cap) for s in range(len(kernels))),
        "kernel_sizes": [tuple(int(k) for k in ks) for ks in kernels],
        "strides": [tuple(int(s) for s in st) for st in conf["pool_op_kernel_sizes"]],
        "n_conv_per_stage": [int(n) for n in conf["n_conv_per_stage_encoder"]],
        "n_conv_per_stage_decoder": [int(n) for n in conf["n_conv_per_stage_decoder"]],
        "conv_bias": True,  # v2.2's get_network_from_plans builds PlainConvUNet with conv_bias=True
    }


def read_plans(plans, configuration: str = "3d_fullres", *, source: str = "--plans") -> dict:
    """Patch size, grid and topology of one configuration of an nnU-Net v2 plans (a dict or a plans.json path).

    Refuses plans that `mome.predict` would not reproduce: axes transposed before the network, a normalisation
    other than the whole-volume z-score (MoME disables crop-to-nonzero, so `use_mask_for_norm` is False), a
    network other than an InstanceNorm/LeakyReLU PlainConvUNet.

    Returns:
        {"patch_size": (3,), "arch": PlainUNet kwargs without in_channels / num_classes}.
    """
    if not isinstance(plans, dict):
        path = Path(plans)
        plans = read_json_file(path, source, "plans.json")
        source = f"{source} {path}"
        if not isinstance(plans, dict):
            raise InputError(f"{source}: expected a JSON object, got {type(plans).__name__}.")
    conf = _configuration(plans, configuration, source)
    transpose = plans.get("transpose_forward", [0, 1, 2])
    if list(transpose) != [0, 1, 2]:
        raise InputError(f"{source}: transpose_forward {transpose} reorders the axes, which mome.predict does not do.")
    schemes = conf.get("normalization_schemes", ["ZScoreNormalization"])
    if any(s != "ZScoreNormalization" for s in schemes) or any(conf.get("use_mask_for_norm", [False])):
        raise InputError(
            f"{source}: normalisation {schemes} with use_mask_for_norm {conf.get('use_mask_for_norm')}; MoME "
            "z-scores the whole volume (ZScoreNormalization, use_mask_for_norm false)."
        )
    try:
        arch = _arch_v24(conf["architecture"], source) if "architecture" in conf else _arch_v22(conf, source)
        patch = tuple(int(p) for p in conf["patch_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{source}: configuration {configuration!r} lacks a readable {err} entry.") from err
    if len(patch) != 3:
        raise InputError(f"{source}: patch_size {list(patch)} is not 3D.")
    return {"patch_size": patch, "arch": arch}
