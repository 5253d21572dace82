"""The files of a training run: what checkpoint.pt and best.pt hold, and rebuilding the trained model from them.

A run folder holds checkpoint.pt (the last state, to resume), best.pt (the state of the best validation, when
the run validates), log.csv, val.csv and split.json. A checkpoint is a plain dict (`shared.checkpoint`):
kind "moe_missing", the model config, the weights, optimizer / scaler / RNG state, the step, the flags of the
run, `dedicated` (the code of a dedicated model, else None) and `best` (metric, value and step of the best
validation so far, or None).
"""

import dataclasses

from moe_missing.model import MoEUNet, MoEUNetConfig, build_model
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.errors import InputError

KIND = "moe_missing"


def config_from_checkpoint(ckpt: dict) -> MoEUNetConfig:
    """Rebuild the config stored in a checkpoint (lists back to tuples)."""
    return MoEUNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()})


def save_run(path, *, model, cfg, optimizer, scaler, step: int, args, rng, best) -> None:
    """Atomically write everything to predict with, or resume, the run (un-compiled, un-wrapped model)."""
    save_checkpoint(path, kind=KIND, config=dataclasses.asdict(cfg), model=model.state_dict(),
                    optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step, dedicated=args.dedicated,
                    args={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                    rng=rng, best=best)  # fmt: skip


def load_run_checkpoint(path, map_location="cpu") -> dict:
    """A `moe_missing.train` checkpoint; refuses other kinds and bare state_dicts with one sentence."""
    ckpt = load_checkpoint(path, map_location=map_location, expect_kind=KIND)
    if "config" not in ckpt or "model" not in ckpt or "args" not in ckpt:
        raise InputError(f"{path} is not a checkpoint of moe_missing.train (no config, model and args entries); "
                         "pass the checkpoint.pt or best.pt of a training run folder.")  # fmt: skip
    return ckpt


def load_model(path, device) -> tuple[MoEUNet, dict]:
    """Rebuild the model of a `moe_missing.train` checkpoint, in eval mode on `device`."""
    ckpt = load_run_checkpoint(path, map_location=device)
    model = build_model(config_from_checkpoint(ckpt))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
