"""Benchmark of shared.sliding_window against a one-tile-at-a-time loop and MONAI (if installed).

Run: .venv/bin/python tests/bench_sliding_window.py   (about 1-2 minutes on 2 CPU cores)

Setting: a (1, 1, 160, 196, 160) volume, 128^3 tiles, overlap 0.5, Gaussian blending (sigma = patch / 8), a
small conv model (Conv3d 1->8 k3, ReLU, Conv3d 8->2 k3). Each method runs in its own child process so that
its peak memory is its own: on CPU the peak is `resource.getrusage(...).ru_maxrss` after the runs minus the
resident set size (VmRSS) just before them, i.e. the extra resident memory the inference needed (torch's
allocator is invisible to tracemalloc); on CUDA it is `torch.cuda.max_memory_allocated()`.

MONAI differs from ours in two known details, so the "aligned" rows remove both: (1) tile placement: MONAI
steps by int(128 * (1 - overlap)) and pulls only the last tile back (196 -> 0, 64, 68), ours spreads the
tiles evenly (0, 34, 68); with overlap 47/64 both place tiles at 0, 34, 68 and 0, 32. (2) MONAI clips the
Gaussian at 1e-3 (ours at its smallest positive value), so the aligned run of ours passes a map clipped at
the same level. MONAI's map is not normalised to max 1 (its peak is 0.9985), so that level is 1e-3 / 0.9985
on ours; clipping ours at plain 1e-3 instead leaves a max difference of about 3e-4 in the logits.
"""

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `import shared` works when run as a script

import torch  # noqa: E402

from shared.cli import run_cli  # noqa: E402
from shared.sliding_window import gaussian_importance_map, sliding_window_inference, tile_starts  # noqa: E402

SHAPE = (1, 1, 160, 196, 160)  # (B, C, D, H, W)
PATCH = (128, 128, 128)
ALIGNED_OVERLAP = 47 / 64  # int(128 * 17 / 64) = 34: MONAI's steps then equal our evenly spread ones
METHODS = ["naive", "ours_tpb2", "ours_tpb4", "monai", "ours_aligned", "monai_aligned"]


def build_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, kernel_size=3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(8, 2, kernel_size=3, padding=1),
    )
    return model.to(device).eval()


def naive_inference(model, image: torch.Tensor, overlap: float) -> torch.Tensor:
    """The straightforward loop: one tile per forward call, same tiles and Gaussian weights as ours."""
    weight = gaussian_importance_map(PATCH, device=image.device)
    starts = [tile_starts(s, p, overlap) for s, p in zip(image.shape[2:], PATCH)]
    logits, weight_sum = None, torch.zeros(image.shape[2:], device=image.device)
    with torch.no_grad():
        for z in starts[0]:
            for y in starts[1]:
                for x in starts[2]:
                    win = (slice(z, z + PATCH[0]), slice(y, y + PATCH[1]), slice(x, x + PATCH[2]))
                    out = model(image[(..., *win)]).float()
                    if logits is None:
                        logits = torch.zeros((image.shape[0], out.shape[1], *image.shape[2:]), device=image.device)
                    logits[(..., *win)] += out * weight
                    weight_sum[win] += weight
    return logits / weight_sum


def run_method(method: str, model, image: torch.Tensor) -> torch.Tensor:
    if method == "naive":
        return naive_inference(model, image, overlap=0.5)
    if method in ("ours_tpb2", "ours_tpb4"):
        return sliding_window_inference(model, image, PATCH, overlap=0.5, tiles_per_batch=int(method[-1]))
    if method == "ours_aligned":
        # MONAI clips its unnormalised map at 1e-3; its peak is below 1 for even sizes (the centre falls
        # between voxels), so the same clip on our max-1 map sits at 1e-3 / peak.
        monai_peak = math.prod(math.exp(-((0.5 if n % 2 == 0 else 0.0) ** 2) / (2 * (n / 8) ** 2)) for n in PATCH)
        weight = gaussian_importance_map(PATCH, device=image.device, min_value=1e-3 / monai_peak)
        return sliding_window_inference(
            model, image, PATCH, overlap=ALIGNED_OVERLAP, tiles_per_batch=4, gaussian=weight
        )
    from monai.inferers import sliding_window_inference as monai_swi

    overlap = 0.5 if method == "monai" else ALIGNED_OVERLAP
    with torch.no_grad():
        out = monai_swi(image, PATCH, 4, model, overlap=overlap, mode="gaussian", sigma_scale=0.125)
    return out.as_tensor() if hasattr(out, "as_tensor") else out  # MONAI may return a MetaTensor


def vm_rss_kib() -> int:
    """Current resident set size in KiB (Linux /proc), the baseline for the ru_maxrss peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(method: str, repeats: int, out_dir: Path) -> None:
    """Run one method `repeats` times; write its output tensor and a JSON line of timings and memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(device)
    image = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = vm_rss_kib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run_method(method, model, image)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    torch.save(out.cpu(), out_dir / f"{method}.pt")
    record = {"method": method, "times": times, "peak_mib": peak_mib, "device": device.type}
    (out_dir / f"{method}.json").write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method; the best one is reported")
    parser.add_argument("--no-monai", action="store_true", help="skip the MONAI rows even if MONAI is installed")
    parser.add_argument("--child", choices=METHODS, help="internal: run one method in this process")
    parser.add_argument("--out-dir", type=Path, help="internal: where a child writes its results")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.repeats, args.out_dir)
        return

    try:
        import monai  # noqa: F401

        has_monai = not args.no_monai
    except ImportError:
        has_monai = False
    methods = [m for m in METHODS if has_monai or "monai" not in m]
    print(f"volume {SHAPE}, patch {PATCH}, torch threads {torch.get_num_threads()}, repeats {args.repeats}")
    for axis, size in zip("DHW", SHAPE[2:]):
        print(f"  tile starts {axis}: ours {tile_starts(size, PATCH[0], 0.5)}")

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        records = {}
        for method in methods:
            cmd = [sys.executable, __file__, "--child", method, "--repeats", str(args.repeats), "--out-dir", tmp]
            subprocess.run(cmd, check=True)
            records[method] = json.loads((out_dir / f"{method}.json").read_text())
            print(f"  done {method}: best {min(records[method]['times']):.2f} s", flush=True)
        outputs = {m: torch.load(out_dir / f"{m}.pt", weights_only=True, map_location="cpu") for m in methods}

    # each row is compared with the output it should reproduce
    reference = {
        "naive": "ours_tpb4",
        "ours_tpb2": "naive",
        "ours_tpb4": "naive",
        "monai": "ours_tpb4",
        "ours_aligned": "ours_tpb4",
        "monai_aligned": "ours_aligned",
    }
    base = min(records["ours_tpb4"]["times"])
    mem_unit = "cuda max alloc" if records["naive"]["device"] == "cuda" else "ru_maxrss - VmRSS"
    print(f"\n{'method':<15}{'best s':>8}{'x ours4':>9}{'peak MiB':>10}  {'max |diff|':>10}  vs")
    for method in methods:
        best = min(records[method]["times"])
        ref = reference[method]
        diff = (outputs[method] - outputs[ref]).abs().max().item()
        print(f"{method:<15}{best:>8.2f}{best / base:>9.2f}{records[method]['peak_mib']:>10.0f}  {diff:>10.2e}  {ref}")
    print(f"(peak MiB: {mem_unit}; x ours4: time relative to ours with 4 tiles per forward call)")


if __name__ == "__main__":
    run_cli(main)
