"""Benchmark: our SwinUNETR vs MONAI's on the same weights and input (CPU), with and without activation checkpointing.

    .venv/bin/python tests/bench_brainsegfounder.py [--size 64] [--repeats 1]

Forward + backward wall time (median over repeats after one forward as warm-up, the configurations interleaved
in one process; a few minutes on 2 cores) and the activation memory kept for backward (bytes of the distinct
tensors autograd saves during the forward, the part of peak memory that checkpointing removes). Goal of the
issue: ours at most as slow as MONAI.
"""

import argparse
import statistics
import time

import torch

from brainsegfounder.model import SwinUNETR
from shared.profiling import saved_tensor_bytes


def step_seconds(model, x) -> float:
    """Wall time of one forward + backward."""
    t0 = time.perf_counter()
    model(x).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def monai_models(feature_size: int):
    """MONAI's SwinUNETR without and with checkpointing, or {} when MONAI is not installed."""
    try:
        import monai.networks.nets.swin_unetr as swin_unetr
    except ImportError:
        return {}

    def rearrange(x, pattern):  # einops is not a dependency; MONAI only permutes axes with it
        src, dst = (side.split() for side in pattern.split("->"))
        return x.permute(*[src.index(axis) for axis in dst])

    swin_unetr.rearrange = rearrange
    return {
        f"MONAI{' + ckpt' * ckpt}": swin_unetr.SwinUNETR(
            in_channels=4, out_channels=3, feature_size=feature_size, use_checkpoint=ckpt
        )  # fmt: skip
        for ckpt in (False, True)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="cubic input side (multiple of 32, >= 64)")
    parser.add_argument("--feature-size", type=int, default=48, help="SwinUNETR feature size (paper: 48)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per configuration")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = monai_models(args.feature_size)
    reference = next(iter(models.values()), None)
    for ckpt in (False, True):
        ours = SwinUNETR(4, 3, feature_size=args.feature_size, use_checkpoint=ckpt)
        if reference is not None:
            ours.load_state_dict(reference.state_dict(), strict=True)
        models[f"ours{' + ckpt' * ckpt}"] = ours
    for model in models.values():
        model.load_state_dict(next(iter(models.values())).state_dict())
        model.train()
    x = torch.randn(1, 4, args.size, args.size, args.size)
    memory = {
        name: saved_tensor_bytes(lambda m=model: m(x).float().square().mean()) for name, model in models.items()
    }  # doubles as warm-up
    times = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved, so load changes hit every configuration alike
        for name, model in models.items():
            times[name].append(step_seconds(model, x))
    base = "MONAI" if "MONAI" in models else "ours"
    base_time = statistics.median(times[base])
    print(f"SwinUNETR fs={args.feature_size}, input 1x4x{args.size}^3, CPU {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")  # fmt: skip
    print(f"{'model':>14} {'fwd+bwd s':>10} {'vs ' + base:>10} {'saved MB':>10}")
    for name in models:
        t = statistics.median(times[name])
        print(f"{name:>14} {t:>10.2f} {t / base_time:>10.2f} {memory[name] / 2**20:>10.0f}")


if __name__ == "__main__":
    main()
