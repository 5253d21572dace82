"""The run harness shared by the four training scripts: device, AMP, compile, DDP, seeding, logging, lr.

A training script uses it top-down, in the loop order of STYLE.md item 3::

    def main():
        dist_info = init_distributed()
        rng = seed_everything(args.seed, rank=dist_info.rank)
        amp_dtype = pick_amp_dtype(dist_info.device, enabled=args.amp)
        scaler = make_grad_scaler(dist_info.device, amp_dtype)
        model, raw_model = maybe_compile(wrap_ddp(build_model(cfg).to(dist_info.device), dist_info), args.compile)
        for step in range(start, total):
            lr = poly_lr(step, total, args.lr)  # set on every param group
            with autocast_context(dist_info.device, enabled=args.amp):
                loss = loss_fn(model(x), y)
            check_finite_loss(loss, step, checkpoint_path=ckpt)
            scaler.scale(loss).backward()
            scaler.unscale_(opt); clip; scaler.step(opt); scaler.update(); opt.zero_grad(set_to_none=True)
            logger.log(step=step, loss=all_reduce_mean(loss.item()), lr=lr)

    if __name__ == "__main__":
        run_cli(main)  # after main() returns (its DDP model freed), leaves the process group

`raw_model` (un-compiled, un-wrapped) is what goes into the checkpoint.
"""

import contextlib
import csv
import gc
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shared.atomic import atomic_path
from shared.errors import InputError

_DEVICE_PRINTED = False  # pick_device announces the device once per process, not at every call


# ----------------------------------------------------------------------------- device and AMP


def pick_device(prefer: str | None = None) -> torch.device:
    """Choose the device once at the top of an entry point and print it (rank 0 only, first call only).

    Args:
        prefer: None or "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".
    Returns:
        The device; a bare "cuda" becomes `cuda:$LOCAL_RANK` so each torchrun process owns one GPU.
    """
    global _DEVICE_PRINTED
    choice = (prefer or "auto").lower()
    if choice not in ("auto", "cpu") and not choice.startswith("cuda"):
        raise InputError(f"--device {prefer!r} is not one of auto, cpu, cuda, cuda:N.")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {prefer!r} was requested but CUDA is not available on this machine.")
    use_cuda = choice.startswith("cuda") or (choice == "auto" and torch.cuda.is_available())
    if not use_cuda:
        device = torch.device("cpu")
    elif ":" in choice:
        index = choice.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise InputError(f"--device {prefer!r} names no GPU of this machine ({torch.cuda.device_count()} found).")
        device = torch.device("cuda", int(index))
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        # so that kernels and NCCL use this process's GPU even where a call does not name the device
        torch.cuda.set_device(device)
    if not _DEVICE_PRINTED and int(os.environ.get("RANK", "0")) == 0:
        name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
        print(f"device: {device}{name}", flush=True)
    _DEVICE_PRINTED = True
    return device


def pick_amp_dtype(device: torch.device, enabled: bool = True, cpu_bf16: bool = False) -> torch.dtype | None:
    """The autocast dtype for `device`, or None for plain float32.

    Args:
        device: the training device.
        enabled: False turns AMP off everywhere.
        cpu_bf16: use bfloat16 autocast on CPU too (off by default; lets tests run the AMP path on CPU).
    Returns:
        torch.bfloat16 on CUDA that supports it, else torch.float16 on CUDA; on CPU bfloat16 with
        `cpu_bf16`, else None.
    """
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16 else None


def autocast_context(device: torch.device, enabled: bool = True, cpu_bf16: bool = False):
    """Context manager for the forward pass: `torch.autocast` with `pick_amp_dtype`'s dtype, else a no-op."""
    dtype = pick_amp_dtype(device, enabled=enabled, cpu_bf16=cpu_bf16)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 on CUDA.

    bf16 has float32's exponent range, so its gradients do not underflow and need no scaling. A
    disabled scaler passes through: `scale(loss)` is `loss`, `step(opt)` is `opt.step()`, `update()`
    does nothing, so the loop reads the same on every device.
    """
    enabled = device.type == "cuda" and amp_dtype == torch.float16
    return torch.amp.GradScaler(device.type, enabled=enabled)


def maybe_compile(model: torch.nn.Module, enabled: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Compile `model` if asked.

    Args:
        model: a plain module or a DDP-wrapped one (wrap first, then compile).
        enabled: call `torch.compile`.
    Returns:
        (model_for_forward, model_to_save): the second is always the plain, un-compiled, un-wrapped
        module; it shares its parameters with the first, so its state_dict has no `_orig_mod.` or
        `module.` prefixes.
    """
    model_to_save = model.module if isinstance(model, DistributedDataParallel) else model
    model_for_forward = torch.compile(model) if enabled else model
    return model_for_forward, model_to_save


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int  # global rank, 0 .. world_size-1
    world_size: int  # number of processes
    local_rank: int  # rank on this node; picks the GPU
    is_main: bool  # rank 0: the only process that writes checkpoints and logs
    device: torch.device


def init_distributed(prefer: str | None = None) -> DistInfo:
    """Join the process group that torchrun describes in the environment, or run single-process.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without WORLD_SIZE (or
    with WORLD_SIZE=1) no process group is created. The backend is NCCL on GPU and gloo on CPU.

    Args:
        prefer: device preference passed to `pick_device`.
    Returns:
        DistInfo of this process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(prefer)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, is_main=rank == 0, device=device)


def wrap_ddp(model: torch.nn.Module, dist_info: DistInfo, find_unused_parameters: bool = False) -> torch.nn.Module:
    """Wrap `model` (already on `dist_info.device`) in DDP when there is more than one process.

    DDP broadcasts rank 0's parameters at construction, so ranks seeded differently still start equal.
    `find_unused_parameters` is needed when some parameters get no gradient in a step (e.g. a deep-supervision
    head whose loss weight is 0).
    """
    if dist_info.world_size == 1:
        return model
    device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def cleanup_distributed() -> None:
    """Leave the process group, if one was created; `shared.cli.run_cli` calls it after `main()` returns.

    Call it only once the DDP-wrapped models are unreferenced: a DDP reducer that outlives its gloo group
    can abort the process at exit ("terminate called without an active exception", about one run in
    five with torch 2.13 on CPU). `gc.collect()` frees wrappers held in reference cycles; the barrier lets
    every rank finish its last collective before any rank tears its connections down.
    """
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(value: float | torch.Tensor) -> float | torch.Tensor:
    """Mean of `value` over all ranks (a float, or a tensor of any shape); unchanged when single-process."""
    if not dist.is_initialized():
        return value
    # NCCL only reduces CUDA tensors; gloo takes CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    is_tensor = torch.is_tensor(value)
    buf = (
        value.detach().to(device=device, dtype=torch.float64, copy=True)
        if is_tensor
        else torch.tensor(float(value), dtype=torch.float64, device=device)
    )
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf /= dist.get_world_size()
    return buf.to(device=value.device, dtype=value.dtype) if is_tensor else buf.item()


# ----------------------------------------------------------------------------- seeding


def seed_everything(seed: int, rank: int = 0) -> np.random.Generator:
    """Seed python `random`, numpy's global RNG and torch (CPU and CUDA) with `seed + rank`.

    The rank offset makes every process draw different patches and augmentations.

    Returns:
        A `np.random.Generator` seeded with `seed + rank`, for the data pipeline.
    """
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return np.random.default_rng(seed)


def rng_state(generator: np.random.Generator | None = None) -> dict:
    """Capture every RNG of this process as tensors and plain values, loadable with `weights_only=True`.

    Args:
        generator: the data pipeline's numpy Generator, if any.
    Returns:
        {"python": {...}, "numpy": {...}, "torch": uint8 tensor, ["cuda": list of uint8 tensors],
        ["numpy_generator": JSON string]}; the Generator's state is JSON because its 128-bit ints do not
        fit an int64 tensor.
    """
    version, mt_words, gauss_next = random.getstate()  # mt_words: 624 state words + position, all < 2**32
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "mt": torch.tensor(mt_words, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        # default= turns array-valued states (e.g. an MT19937 Generator's key) into lists
        state["numpy_generator"] = json.dumps(generator.bit_generator.state, default=lambda a: a.tolist())
    return state


def gather_rng_state(generator: np.random.Generator | None = None) -> list[dict]:
    """`rng_state` of every rank, in rank order (collective: every rank must call it).

    Only rank 0 writes the checkpoint, so it has to hold the other ranks' states for an exact resume.
    """
    state = rng_state(generator)
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state: dict | list, generator: np.random.Generator | None = None) -> None:
    """Restore RNGs captured by `rng_state` (a dict) or `gather_rng_state` (a list, one per rank).

    With a list from a run with a different number of ranks there is no state for this rank: the RNGs
    keep their `seed_everything` seeding and rank 0 says that the resume is not bit-exact.
    """
    if isinstance(state, list):
        rank = dist.get_rank() if dist.is_initialized() else 0
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        if len(state) != world_size:
            if rank == 0:
                print(f"note: checkpoint RNG state is for {len(state)} ranks, this run has {world_size}; not restored")
            return
        state = state[rank]
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss_next"]))
    legacy = state["numpy"]
    keys = legacy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, legacy["pos"], legacy["has_gauss"], legacy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if generator is not None and "numpy_generator" in state:
        generator.bit_generator.state = json.loads(state["numpy_generator"])


# ----------------------------------------------------------------------------- logging


def check_finite_loss(loss: float | torch.Tensor, step: int, checkpoint_path=None) -> None:
    """Stop training on a NaN or Inf loss, naming the step and the last good checkpoint, or saying there is none.

    Args:
        loss: this step's loss.
        step: the step number, for the message.
        checkpoint_path: the run's checkpoint file; it is named only if it exists (a loss that goes NaN before
            the first save has no good checkpoint to go back to).

    On CUDA this synchronises with the GPU (one `.item()` per call); the loop logs the loss anyway.
    """
    value = float(loss.detach().float().item()) if torch.is_tensor(loss) else float(loss)
    if math.isfinite(value):
        return
    kind = "NaN" if math.isnan(value) else "Inf"
    if checkpoint_path is not None and os.path.isfile(checkpoint_path):
        where = f"last good checkpoint kept at {checkpoint_path}"
    elif checkpoint_path is not None:
        where = f"no checkpoint written yet ({checkpoint_path} does not exist)"
    else:
        where = "no checkpoint written yet"
    raise FloatingPointError(f"loss is {kind} at step {step}; {where}.")


class MetricsLogger:
    """Append one row of metrics per `log` call to a CSV (`*.csv`) or JSON-lines (`*.jsonl`) file.

    Only the main rank writes; a resumed run appends to the same file. In a CSV, a metric that first
    appears in a later row adds a column: the file is rewritten once with the wider header and empty
    cells in the earlier rows, so every column stays plottable.
    """

    def __init__(self, path, is_main: bool = True, start_step: int | None = None):
        """Args:
        path: file ending in .csv or .jsonl; parent folders are created.
        is_main: False on ranks other than 0, which then write nothing.
        start_step: the step the run (re)starts from (0, or the resumed checkpoint's step). Rows of an existing
            file logged after it describe work the checkpoint does not hold (a run stopped between a log and
            the next checkpoint) and are dropped, so a resumed run logs no step twice. None keeps every row.
        """
        self.path = Path(path)
        self.is_main = is_main
        if self.path.suffix not in (".csv", ".jsonl"):
            raise InputError(f"metrics log {self.path}: file name must end in .csv or .jsonl.")
        self.columns: list[str] = []
        if is_main and self.path.suffix == ".csv" and self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                self.columns = next(csv.reader(f))
        if is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if is_main and start_step is not None and self.path.is_file():
            self._drop_after(int(start_step))

    def _drop_after(self, step: int) -> None:
        """Rewrite the file (atomically) without the rows whose step is larger than `step`."""
        if self.path.suffix == ".jsonl":
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            if len(kept) < len(lines):
                with atomic_path(self.path) as tmp:
                    Path(tmp).write_text("".join(line + "\n" for line in kept))
            return
        if self.columns:
            self._rewrite_csv(self.columns, max_step=step)

    def log(self, step: int, **metrics) -> None:
        """Append `{"step": step, **metrics}`; tensors and numpy scalars are stored as Python numbers."""
        if not self.is_main:
            return
        row = {"step": int(step)}
        for key, value in metrics.items():
            row[key] = value.item() if isinstance(value, torch.Tensor | np.generic) else value
        if self.path.suffix == ".jsonl":
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            return
        new_keys = [k for k in row if k not in self.columns]
        if new_keys and self.columns:
            self._rewrite_csv(self.columns + new_keys)
        elif new_keys:
            self.columns = list(row)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(row)

    def _rewrite_csv(self, columns: list[str], max_step: int | None = None) -> None:
        """Rewrite the CSV with the header `columns`, keeping the rows whose step is at most `max_step` (every row
        when None); atomically, so a crash keeps the old file. Nothing is written when nothing would change."""
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [row for row in rows if max_step is None or int(row["step"]) <= max_step]
        if columns == self.columns and len(kept) == len(rows):
            return
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(kept)
        self.columns = columns


# ----------------------------------------------------------------------------- learning-rate schedules


def _check_schedule(step: int, total: int) -> None:
    if total <= 0:
        raise InputError(f"total steps must be positive, got total={total}.")
    if step < 0:
        raise InputError(f"step must be non-negative, got step={step}.")


def cosine_lr(step: int, total: int, base: float, min_lr: float = 0.0) -> float:
    """Cosine decay from `base` at step 0 to `min_lr` at `total` (held there after):
    lr = min_lr + (base - min_lr) * (1 + cos(pi * step / total)) / 2."""
    _check_schedule(step, total)
    progress = min(step, total) / total
    return min_lr + 0.5 * (base - min_lr) * (1.0 + math.cos(math.pi * progress))


def poly_lr(step: int, total: int, base: float, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial decay: lr = base * (1 - step / total) ** exponent, 0 from `total` on."""
    _check_schedule(step, total)
    return base * (1.0 - min(step, total) / total) ** exponent


def warmup_cosine_lr(step: int, total: int, base: float, warmup: int, min_lr: float = 0.0) -> float:
    """Linear warm-up then cosine decay.

    Steps 0 .. warmup-1 rise linearly as base * (step + 1) / warmup (so step 0 already trains);
    steps warmup .. total follow `cosine_lr` over the remaining `total - warmup` steps.
    """
    _check_schedule(step, total)
    if not 0 <= warmup < total:
        raise InputError(f"warmup must be in [0, total), got warmup={warmup} with total={total}.")
    if step < warmup:
        return base * (step + 1) / warmup
    return cosine_lr(step - warmup, total - warmup, base, min_lr=min_lr)
