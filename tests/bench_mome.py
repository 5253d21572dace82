"""Benchmark of one MoME training step (5 experts + gate) against five separate expert steps.

Run: .venv/bin/python tests/bench_mome.py [--patch 64] [--features 16 32 64 128] [--steps 2]

Each configuration runs in its own child process, so its peak memory is its own: on CPU the extra resident
memory of the steps (`ru_maxrss` after minus VmRSS before), on CUDA `torch.cuda.max_memory_allocated()`.
Rows: "experts x5" = five single-expert steps (phase 1 of the paper, one after another), "MoME" = one joint
step of phase 2 with the curriculum loss, each with and without activation checkpointing (`--checkpointing`).
Times are the mean of `--steps` steps after one warm-up step; ratios are against "experts x5, plain".
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `import mome` works when run as a script

import torch  # noqa: E402

from mome.config import MoMEConfig  # noqa: E402
from mome.losses import curriculum_loss, deep_supervised_loss, deep_supervision_weights, downsample_target  # noqa: E402
from mome.model import build_expert, build_mome  # noqa: E402

CONFIGS = [("experts x5", False), ("experts x5", True), ("MoME", False), ("MoME", True)]


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child(kind: str, checkpointing: bool, patch: int, features, steps: int) -> dict:
    """Time `steps` training steps of one configuration in this process; returns seconds/step and peak MiB."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = MoMEConfig(features=tuple(features), strides=(1,) + (2,) * (len(features) - 1), checkpointing=checkpointing)
    x = torch.randn(2, 1, patch, patch, patch, device=device)  # (B, 1, D, H, W), batch 2 as nnU-Net's plans
    y = (torch.rand(2, patch, patch, patch, device=device) > 0.95).long()
    modality = torch.tensor([0, 3], device=device)
    weights = deep_supervision_weights(cfg.num_levels).to(device)
    if kind == "MoME":
        nets = [build_mome(cfg).to(device)]
    else:
        nets = [build_expert(cfg).to(device) for _ in range(cfg.num_experts)]
    opts = [torch.optim.SGD(n.parameters(), lr=1e-3, momentum=0.99, nesterov=True) for n in nets]

    def step():
        for net, opt in zip(nets, opts):
            if kind == "MoME":
                out = net(x, return_all=True)
                loss = curriculum_loss(out["fused"], out["experts"], y, modality, epoch=0, num_epochs=2)["loss"]
            else:
                outs = net(x)
                loss = deep_supervised_loss(outs, downsample_target(y, [o.shape[2:] for o in outs]), weights)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    before = _rss_kib()  # model and optimizer are built; the peak below is what the steps add
    step()  # warm-up (allocator, kernels), not timed
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"seconds": (time.perf_counter() - start) / steps, "peak_mib": peak, "device": device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, default=64, help="cubic patch side (divisible by 2^(stages-1))")
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128], help="UNet stage widths")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, ckpt = args.child
        print(json.dumps(child(kind, ckpt == "1", args.patch, args.features, args.steps)))
        return
    results = []
    for kind, ckpt in CONFIGS:
        cmd = [sys.executable, __file__, "--child", kind, str(int(ckpt)), "--patch", str(args.patch),
               "--steps", str(args.steps), "--features", *map(str, args.features)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append((kind, ckpt, json.loads(out.strip().splitlines()[-1])))
    base = results[0][2]
    print(f"MoME training step vs five expert steps: batch 2, patch {args.patch}^3, widths {args.features}, "
          f"5 experts, device {base['device']}, mean of {args.steps} steps")  # fmt: skip
    print(f"{'configuration':34s} {'s/step':>8s} {'x time':>7s} {'peak MiB':>9s} {'x memory':>9s}")
    for kind, ckpt, r in results:
        name = f"{kind}, {'activation checkpointing' if ckpt else 'plain'}"
        print(f"{name:34s} {r['seconds']:8.2f} {r['seconds'] / base['seconds']:7.2f} {r['peak_mib']:9.0f} "
              f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
