"""Checkpoints as plain dicts of tensors and Python values: written atomically, read with weights_only=True.

A training script saves, e.g.::

    save_checkpoint(path, kind="mome", model=raw_model.state_dict(), optimizer=opt.state_dict(),
                    scaler=scaler.state_dict(), step=step, config=dataclasses.asdict(cfg),
                    rng=gather_rng_state(rng))

and resumes with `load_checkpoint(path, map_location=device, expect_kind="mome")`. Only tensors, numbers,
strings, None and dicts/lists/tuples of them are accepted, which is exactly what
`torch.load(..., weights_only=True)` can read back without running arbitrary pickled code.
"""

import os
from collections.abc import Mapping

import torch

from shared.atomic import atomic_path
from shared.errors import InputError
from shared.harness import set_rng_state

_PLAIN_TYPES = (torch.Tensor, bool, int, float, str, type(None))


def _check_plain(value, where: str) -> None:
    """Raise TypeError naming the first entry that weights_only loading would reject."""
    if isinstance(value, _PLAIN_TYPES):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"checkpoint entry {where} has a key of type {type(key).__name__}; use str or int.")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint entry {where} is a {type(value).__name__}; only tensors, numbers, str, None and "
        "dicts/lists/tuples of them load with weights_only=True (convert it, e.g. dataclasses.asdict)."
    )


def save_checkpoint(path, **payload) -> None:
    """Write `payload` to `path` atomically.

    The data goes to a temp file in the same folder, is flushed to disk, then renamed over `path`
    (`shared.atomic.atomic_path`); if anything fails the temp file is removed and a previous checkpoint at `path`
    is left untouched.

    Args:
        path: destination file (parent folders are created).
        **payload: model/optimizer/scaler state_dicts, step, config (a plain dict), rng state, and an
            optional `kind` string naming the model, checked by `load_checkpoint(expect_kind=...)`.
    Raises:
        TypeError: an entry is not a plain type (checked before anything is written).
    """
    for key, value in payload.items():
        _check_plain(value, key)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # atomic_path fsyncs the data before the rename
        torch.save(payload, f)


def load_checkpoint(path, map_location="cpu", expect_kind: str | None = None) -> dict:
    """Read a checkpoint written by `save_checkpoint` (or any weights_only-safe file holding a dict).

    Args:
        path: checkpoint file.
        map_location: device for the tensors (always given, so a GPU checkpoint loads on a CPU).
        expect_kind: if set and the checkpoint records a different `kind`, refuse it.
    Returns:
        The payload dict.
    Raises:
        InputError: the file is missing, empty, unreadable, not a dict, or of another kind.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: checkpoint file not found.")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: checkpoint file is empty.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, or a type weights_only refuses
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(f"{path}: not a readable checkpoint ({type(err).__name__}: {first_line}).") from err
    if not isinstance(payload, dict):
        raise InputError(f"{path}: checkpoint holds a {type(payload).__name__}, expected a dict.")
    kind = payload.get("kind")
    if expect_kind is not None and kind is not None and kind != expect_kind:
        raise InputError(f"{path} is a {kind} checkpoint, expected {expect_kind}.")
    return payload


def strip_prefix(state_dict: Mapping, prefix: str = "module.") -> dict:
    """Remove `prefix` from the keys that start with it (e.g. DDP's "module." in foreign checkpoints).

    Keys without the prefix are kept as they are; the order of the keys is preserved.
    """
    return {(key[len(prefix) :] if key.startswith(prefix) else key): value for key, value in state_dict.items()}


def restore_run(path, *, kind: str, model, optimizer, scaler, generator, device) -> dict:
    """Load a training run's checkpoint into model, optimizer, grad scaler and every RNG (`--resume`).

    Args:
        path: the run's checkpoint, written by `save_checkpoint` with `kind`, `model`, `optimizer`, `scaler`, `rng`.
        kind: the expected checkpoint kind (another kind is refused with InputError).
        generator: the data pipeline's numpy Generator, restored with the other RNGs.
    Returns:
        the checkpoint dict (its step or epoch tells where to continue).
    """
    ckpt = load_checkpoint(path, map_location=device, expect_kind=kind)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], generator=generator)
    return ckpt
