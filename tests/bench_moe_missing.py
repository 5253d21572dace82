"""Benchmark of one MoE conv layer (Novosad et al. Eq. 3): fused weight mixing vs a plain Conv3d vs the naive sum.

Run: .venv/bin/python tests/bench_moe_missing.py [--size 48] [--channels 32] [--reps 2] [--threads 1]

Forward + backward at batch 4, 32 -> 32 channels, 48^3, 4 experts, a different modality code per sample:
- "plain": nn.Conv3d of the same shape (the cost the paper claims for the MoE layer);
- "fused": `MoEConv3d.forward`, mixed kernels and biases, one grouped conv3d for the batch;
- "naive": `MoEConv3d.naive_forward`, N expert convs on the whole batch, gated and summed.
The three run interleaved in one process, `--reps` times after a warm-up; the table shows the median time
and its ratio to "plain". Memory: bytes the autograd graph saves for backward (distinct tensors), and on
CUDA the peak allocation. Goal (issue 4): fused / plain <= 1.15 on CPU.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `import moe_missing` works as a script

import torch  # noqa: E402

from moe_missing.model import MoEConv3d  # noqa: E402
from shared.profiling import saved_tensor_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=48, help="cube side of the input")
    parser.add_argument("--channels", type=int, default=32, help="input and output channels")
    parser.add_argument("--batch", type=int, default=4, help="batch size (one code per sample)")
    parser.add_argument("--experts", type=int, default=4, help="experts N")
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions of each variant")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is stable on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    C, B, S = args.channels, args.batch, args.size
    moe = MoEConv3d(C, C, 3, args.experts, num_modalities=3).to(device).train()
    plain = torch.nn.Conv3d(C, C, 3, padding=1).to(device)
    x = torch.randn(B, C, S, S, S, device=device, requires_grad=True)
    codes = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 1], [1, 1, 1]] * ((B + 3) // 4), device=device)[:B]
    grad = torch.randn(B, C, S, S, S, device=device)
    variants = {
        "plain": lambda: plain(x),
        "fused": lambda: moe(x, codes),
        "naive": lambda: moe.naive_forward(x, codes),
    }

    def run(fn):
        fn().backward(grad)
        x.grad = None
        for p in [*moe.parameters(), *plain.parameters()]:
            p.grad = None

    times = {name: [] for name in variants}
    peaks = {}
    for rep in range(args.reps + 1):
        for name, fn in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            run(fn)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated() / 2**20
            if rep > 0:  # rep 0 is the warm-up
                times[name].append(time.perf_counter() - t0)
    print(f"MoE conv layer fwd+bwd: batch {B}, {C}->{C} channels, {S}^3, {args.experts} experts, device {device}, "
          f"{torch.get_num_threads()} thread(s), median of {args.reps}")  # fmt: skip
    base = statistics.median(times["plain"])
    header = f"{'variant':8s} {'s/iter':>8s} {'x plain':>8s} {'saved MiB':>10s}" + (" peak MiB" if peaks else "")
    print(header)
    for name, fn in variants.items():
        med = statistics.median(times[name])
        line = f"{name:8s} {med:8.3f} {med / base:8.2f} {saved_tensor_bytes(fn) / 2**20:10.1f}"
        print(line + (f" {peaks[name]:8.1f}" if peaks else ""))
    ratio = statistics.median(times["fused"]) / base
    print(f"fused / plain = {ratio:.2f} (goal <= 1.15): {'met' if ratio <= 1.15 else 'NOT met'}")


if __name__ == "__main__":
    main()
