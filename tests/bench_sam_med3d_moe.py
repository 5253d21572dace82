"""Benchmark of SAM-Med3D-MoE: the vit_b_ori image encoder against the official one, side by side, and the
interactive latency per click.

Run: .venv/bin/python tests/bench_sam_med3d_moe.py   (about 2-3 minutes on 2 CPU cores)
     SAM_MED3D_REPO=/path/to/SAM-Med3D ... also times the official module of that checkout

1. Encoder, one 128^3 volume, in this process, interleaved, median of --reps after a warm-up: "official" = the
   official computation (every windowed block pads 8^3 tokens to a 14^3 window and attends over all of them), run
   by our encoder with `literal_padding` (equal to the official module by tests/test_sam_med3d_moe_parity.py),
   and with SAM_MED3D_REPO the official `ImageEncoderViT3D` itself with the same weights; "ours" = the default
   path (`Attention.forward_padded`: real queries only, padded keys summed in closed form). The max absolute
   difference of the embeddings is printed beside the time ratio.
2. Per click, with the image embedding cached: prompt encoder + decoder (single model), and prompt encoder + gate
   + general and top-1 expert decoders + mask selector (MoE), incl. the trilinear upsampling, for the small demo
   config and vit_b_ori. Each configuration runs in its own child process so its peak memory is its own: on CPU
   the extra resident memory (`ru_maxrss` after the runs minus VmRSS before them); on CUDA
   `torch.cuda.max_memory_allocated()`.
Random weights (time does not depend on the values; rel-pos tables non-zero so the bias path is exercised).
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so the packages import when run as a script

import torch  # noqa: E402

from sam_med3d_moe.config import GateConfig, SamConfig, small_config  # noqa: E402
from sam_med3d_moe.image_encoder import ImageEncoderViT3D  # noqa: E402
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


def _official_encoder(repo: Path, cfg: SamConfig):
    """The official ImageEncoderViT3D of a SAM-Med3D checkout with the vit_b_ori arguments of _build_sam3D_ori."""
    from functools import partial

    spec = importlib.util.spec_from_file_location(
        "ref_image_encoder3D", repo / "segment_anything/modeling/image_encoder3D.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ImageEncoderViT3D(
        depth=cfg.encoder_depth,
        embed_dim=cfg.encoder_dim,
        img_size=cfg.image_size,
        mlp_ratio=cfg.mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=cfg.encoder_heads,
        patch_size=cfg.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=list(cfg.global_attn_indexes),
        window_size=cfg.window_size,
        out_chans=cfg.prompt_dim,
    )


def _set_literal(encoder: ImageEncoderViT3D, on: bool) -> None:
    for block in encoder.blocks:
        block.literal_padding = on


@torch.no_grad()
def encoder_side_by_side(device: str, reps: int) -> None:
    """Section 1: official vs ours, same weights and input, interleaved."""
    cfg = SamConfig()
    torch.manual_seed(0)
    ours = ImageEncoderViT3D(cfg)
    for name, p in ours.named_parameters():
        if "rel_pos" in name:
            torch.nn.init.normal_(p, std=0.02)  # zero-initialised otherwise: exercise the bias terms
    ours = ours.eval().to(device)
    image = torch.randn(1, 1, *(cfg.image_size,) * 3, device=device)
    runs = {"official (literal padding)": lambda: (_set_literal(ours, True), ours(image))[1]}
    repo = os.environ.get("SAM_MED3D_REPO")
    if repo and (Path(repo) / "segment_anything/modeling/image_encoder3D.py").is_file():
        official = _official_encoder(Path(repo), cfg)
        official.load_state_dict(ours.state_dict())
        official = official.eval().to(device)
        runs = {"official module (checkout)": lambda: official(image), **runs}
    runs["ours"] = lambda: (_set_literal(ours, False), ours(image))[1]
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and the outputs compared
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    base = next(iter(runs))
    print(
        f"1. vit_b_ori image encoder, 1x1x128^3, device {device}, {torch.get_num_threads()} threads, median of {reps}"
    )
    print(f"ratio and max |diff| of the embedding: against {base!r}")
    print(f"{'encoder':<30}{'s/volume':>10}{'ratio':>8}{'max |diff|':>12}")
    for name in runs:
        median = statistics.median(times[name])
        diff = (outputs[name] - outputs[base]).abs().max().item()
        print(f"{name:<30}{median:>10.3f}{median / statistics.median(times[base]):>8.2f}{diff:>12.2e}")


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
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--reps", type=int, default=3, help="timed encoder runs of each kind (section 1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.device)))
        return
    encoder_side_by_side(args.device, args.reps)
    print()
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
        f"2. device {args.device}, {torch.get_num_threads()} threads; per click = prompt encoder + decoder(s) "
        "+ upsampling"
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
