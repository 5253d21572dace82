"""Benchmark of one MoME training step (5 experts + gate) against five separate expert steps.

Run: .venv/bin/python tests/bench_mome.py [--patch 64] [--features 16 32 64 128] [--reps 2] [--threads 2]

Configurations: "experts x5" = five single-expert steps one after another (phase 1 of the paper), "MoME" = one
joint step of phase 2 with the curriculum loss (Eq. 2), each without and with activation checkpointing.
- Time: all four run in this process, interleaved, `--reps` times after one warm-up round; median seconds per
  step and the ratio to "experts x5, plain".
- Activation memory: bytes autograd keeps for backward during the step's forward (exact on any device).
- Peak memory: each configuration once more in its own child process, so the peak is its own: on CPU the
  resident memory the step adds (peak VmHWM after minus VmRSS before), on CUDA `max_memory_allocated()`.
"""

import argparse
import json
import statistics
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
from shared.profiling import saved_tensor_bytes  # noqa: E402

CONFIGS = [("experts x5", False), ("experts x5", True), ("MoME", False), ("MoME", True)]


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (peak resident of this process;
    unlike `ru_maxrss`, which a child inherits from its parent at fork, it starts afresh at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


class Step:
    """One training step of a configuration: its networks, SGD optimisers and a fixed batch."""

    def __init__(self, kind: str, checkpointing: bool, patch: int, features, device):
        torch.manual_seed(0)
        cfg = MoMEConfig(features=tuple(features), strides=(1,) + (2,) * (len(features) - 1),
                         checkpointing=checkpointing)  # fmt: skip
        self.kind, self.device = kind, device
        self.x = torch.randn(2, 1, patch, patch, patch, device=device)  # (B, 1, D, H, W), batch 2 (nnU-Net plans)
        self.y = (torch.rand(2, patch, patch, patch, device=device) > 0.95).long()
        self.modality = torch.tensor([0, 3], device=device)  # a T1 and a FLAIR sample
        self.weights = deep_supervision_weights(cfg.num_levels).to(device)
        if kind == "MoME":
            self.nets = [build_mome(cfg).to(device)]
        else:
            self.nets = [build_expert(cfg).to(device) for _ in range(cfg.num_experts)]
        self.opts = [torch.optim.SGD(n.parameters(), lr=1e-3, momentum=0.99, nesterov=True) for n in self.nets]

    def loss(self, net) -> torch.Tensor:
        if self.kind == "MoME":
            out = net(self.x, return_all=True)
            return curriculum_loss(out["fused"], out["experts"], self.y, self.modality, epoch=0, num_epochs=2)["loss"]
        outs = net(self.x)
        return deep_supervised_loss(outs, downsample_target(self.y, [o.shape[2:] for o in outs]), self.weights)

    def __call__(self) -> float:
        """Run the step; returns its wall time in seconds."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for net, opt in zip(self.nets, self.opts):
            self.loss(net).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def saved_bytes(self) -> int:
        """Activation memory of the step: for five experts, the largest of their (sequential) forwards."""
        return max(saved_tensor_bytes(lambda n=net: self.loss(n)) for net in self.nets)


def child_peak_mib(kind: str, checkpointing: bool, patch: int, features, device) -> float:
    """Peak memory (MiB) that one step of this configuration adds, measured in this (fresh) process."""
    step = Step(kind, checkpointing, patch, features, device)
    before = _status_kib("VmRSS")  # networks and optimisers exist; the peak below is what the step adds
    step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (_status_kib("VmHWM") - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, default=64, help="cubic patch side (divisible by 2^(stages-1))")
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128], help="UNet stage widths")
    parser.add_argument("--reps", type=int, default=2, help="timed rounds over the four configurations")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        kind, ckpt = args.child
        print(json.dumps(child_peak_mib(kind, ckpt == "1", args.patch, args.features, device)))
        return
    steps = {(kind, ckpt): Step(kind, ckpt, args.patch, args.features, device) for kind, ckpt in CONFIGS}
    saved = {key: step.saved_bytes() / 2**20 for key, step in steps.items()}
    times = {key: [] for key in steps}
    for rep in range(args.reps + 1):  # interleaved, so load changes hit every configuration alike
        for key, step in steps.items():
            seconds = step()
            if rep > 0:  # round 0 is the warm-up
                times[key].append(seconds)
    peaks = {}
    for kind, ckpt in CONFIGS:
        cmd = [sys.executable, __file__, "--child", kind, str(int(ckpt)), "--patch", str(args.patch),
               "--threads", str(args.threads), "--features", *map(str, args.features)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        peaks[(kind, ckpt)] = json.loads(out.strip().splitlines()[-1])
    base = CONFIGS[0]
    base_time = statistics.median(times[base])
    print(f"MoME training step vs five expert steps: batch 2, patch {args.patch}^3, widths {args.features}, "
          f"5 experts, device {device}, {torch.get_num_threads()} thread(s), median of {args.reps}")  # fmt: skip
    print(f"{'configuration':36s} {'s/step':>7s} {'x time':>7s} {'saved MiB':>10s} {'x saved':>8s} "
          f"{'peak MiB':>9s} {'x peak':>7s}")  # fmt: skip
    for kind, ckpt in CONFIGS:
        key = (kind, ckpt)
        name = f"{kind}, {'activation checkpointing' if ckpt else 'plain'}"
        t = statistics.median(times[key])
        print(f"{name:36s} {t:7.2f} {t / base_time:7.2f} {saved[key]:10.0f} {saved[key] / saved[base]:8.2f} "
              f"{peaks[key]:9.0f} {peaks[key] / max(peaks[base], 1e-9):7.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
