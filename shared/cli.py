"""Command-line flags that every training entry point shares."""

import argparse


def add_run_args(group, *, out_holds: str, unit: str, compiled: str = "the model") -> None:
    """Add --out, --resume, --stop-after, --seed, --device, --amp and --compile to a parser or argument group.

    Args:
        group: an `argparse.ArgumentParser` or one of its argument groups.
        out_holds: what the run folder holds, for the help text (e.g. "checkpoint.pt, log.csv").
        unit: what --stop-after counts ("epochs" or "steps").
        compiled: what --compile compiles, for the help text.
    """
    group.add_argument("--out", required=True, help=f"run folder: {out_holds}")
    group.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly where it stopped")
    group.add_argument("--stop-after", type=int, help=f"stop after this many {unit} in this call (time-limited jobs; "
                       "continue with --resume)")  # fmt: skip
    group.add_argument("--seed", type=int, default=0, help="random seed (each torchrun rank adds its rank)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help=f"torch.compile {compiled} (default: on for CUDA, off on CPU)")  # fmt: skip
