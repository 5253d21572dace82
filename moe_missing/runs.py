"""The files of a training run: what checkpoint.pt and best.pt hold, and rebuilding the trained model from them.

A run folder holds checkpoint.pt (the last state, to resume), best.pt (the state of the best validation, when
the run validates), log.csv, val.csv and split.json. A checkpoint is a plain dict (`shared.checkpoint`):
kind "moe_missing", the model config, the weights, optimizer / scaler / RNG state, the step, the flags of the
run, `dedicated` (the code of a dedicated model, else None) and `best` (metric, value and step of the best
validation so far, or None).
"""

import dataclasses

from moe_missing.model import MoEUNet, MoEUNetConfig, build_model
from shared.checkpoint import load_run_checkpoint, plain_args, save_checkpoint

KIND = "moe_missing"
RUN_KEYS = ("model", "config", "args")  # what predict and evaluate read from a run checkpoint
HINT = "pass the checkpoint.pt or best.pt of a moe_missing.train run folder"


def config_from_checkpoint(ckpt: dict) -> MoEUNetConfig:
    """Rebuild the config stored in a checkpoint (lists back to tuples)."""
    return MoEUNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()})


def save_run(path, *, model, cfg, optimizer, scaler, step: int, args, rng, best) -> None:
    """Atomically write everything to predict with, or resume, the run (un-compiled, un-wrapped model)."""
    save_checkpoint(path, kind=KIND, config=dataclasses.asdict(cfg), model=model.state_dict(),
                    optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step, dedicated=args.dedicated,
                    args=plain_args(args), rng=rng, best=best)  # fmt: skip


def load_model(path, device) -> tuple[MoEUNet, dict]:
    """Rebuild the model of a `moe_missing.train` checkpoint, in eval mode on `device`."""
    ckpt = load_run_checkpoint(path, kind=KIND, map_location=device, keys=RUN_KEYS, hint=HINT)
    model = build_model(config_from_checkpoint(ckpt))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
