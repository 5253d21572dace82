"""Benchmark of SAM-Med3D-MoE interactive latency: image-encoder time per volume and, with the image embedding
cached, time per click of prompt encoder + decoder (single model) and of prompt encoder + gate + general and
top-1 expert decoders + mask selector (MoE), for the small demo config and the full-size vit_b_ori.

Run: .venv/bin/python tests/bench_sam_med3d_moe.py   (about 1-2 minutes on 2 CPU cores)

Random weights (latency does not depend on the values). Each configuration runs in its own child process so its
peak memory is its own: on CPU the extra resident memory (`ru_maxrss` after the runs minus VmRSS before them);
on CUDA `torch.cuda.max_memory_allocated()`. A click includes the trilinear upsampling to the input size.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so the packages import when run as a script

import torch  # noqa: E402

from sam_med3d_moe.config import GateConfig, SamConfig, small_config  # noqa: E402
from sam_med3d_moe.model import build_model, upsample  # noqa: E402
from sam_med3d_moe.moe import SamMed3DMoE, expert_from  # noqa: E402
from shared.cli import run_cli  # noqa: E402

CASES = {"small": (small_config, 1), "small_3experts": (small_config, 3), "vit_b_ori": (SamConfig, 1)}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def child(case: str, device: str) -> dict:
    make, experts = CASES[case]
    torch.manual_seed(0)
    cfg = make(box_prompts=True)
    sam = build_model(cfg).eval().to(device)
    moe = SamMed3DMoE(
        sam,
        [expert_from(sam) for _ in range(experts)],
        GateConfig(tasks=tuple(f"task{i}" for i in range(experts)), dim=cfg.prompt_dim),
    ).eval()
    moe.gate.fc2.bias.data[1] = 5.0  # make the selector fuse (the expensive branch)
    moe.to(device)
    base = _rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    image = torch.randn(1, 1, *(cfg.image_size,) * 3, device=device)
    encoder = _time(lambda: sam.image_encoder(image), repeats=1 if case == "vit_b_ori" else 3)
    emb = sam.image_encoder(image)
    points = (torch.tensor([[[cfg.image_size // 2] * 3]], device=device), torch.ones(1, 1, device=device))
    masks = torch.zeros(1, 1, *(cfg.low_res,) * 3, device=device)
    single = _time(lambda: upsample(sam.decode(emb, points=points, masks=masks), cfg), repeats=10)
    mixture = _time(lambda: upsample(moe.step(emb, points=points, masks=masks)["fused"], cfg), repeats=10)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    )
    params = sum(p.numel() for p in moe.parameters())
    return {
        "case": case,
        "params_M": params / 1e6,
        "encoder_s": encoder,
        "click_single_ms": 1e3 * single,
        "click_moe_ms": 1e3 * mixture,
        "peak_mb": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="configurations to run")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads in the children (0: default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.device)))
        return
    rows = []
    for case in args.cases:
        res = subprocess.run(
            [sys.executable, __file__, "--child", case, "--device", args.device, "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(
        f"device {args.device}, {torch.get_num_threads()} threads; per click = prompt encoder + decoder(s) + upsampling"
    )
    print(
        f"{'config':<16}{'params (M)':>11}{'encoder s/vol':>15}{'click single ms':>17}{'click MoE ms':>14}"
        f"{'MoE/single':>11}{'peak MB':>9}"
    )
    for r in rows:
        print(
            f"{r['case']:<16}{r['params_M']:>11.2f}{r['encoder_s']:>15.3f}{r['click_single_ms']:>17.1f}"
            f"{r['click_moe_ms']:>14.1f}{r['click_moe_ms'] / r['click_single_ms']:>11.2f}{r['peak_mb']:>9.0f}"
        )


if __name__ == "__main__":
    run_cli(main)
