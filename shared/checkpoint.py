"""Checkpoints as plain dicts of tensors and Python values: written atomically, read with weights_only=True.

A training script saves, e.g.::

    save_checkpoint(path, kind="mome", model=raw_model.state_dict(), optimizer=opt.state_dict(),
                    scaler=scaler.state_dict(), step=step, config=dataclasses.asdict(cfg),
                    rng=gather_rng_state(rng))

and resumes with `load_checkpoint(path, map_location=device, expect_kind="mome")`. Only tensors, numbers,
strings, None and dicts/lists/tuples of them are accepted, which is exactly what
`torch.load(..., weights_only=True)` can read back without running arbitrary pickled code.

A training CLI starts or resumes its run folder in one call, before any work::

    ckpt = prepare_run_dir(args.out, resume=args.resume, args=args, kind=KIND, is_main=dist_info.is_main)
    ...  # build model, optimizer, scaler
    if ckpt is not None:
        start = restore_run(ckpt, kind=KIND, model=model, optimizer=opt, scaler=scaler, generator=rng,
                            device=device)["step"]
    ...
    save_checkpoint(ckpt_path, kind=KIND, ..., args=plain_args(args))

`prepare_run_dir` refuses a --resume with other flags than the first call (`check_same_run`), except
`shared.cli.RESUME_MUTABLE_FLAGS` (and `RESUME_EXTENDABLE_FLAGS` when they grow), and removes the stale temp
files of a killed save.

Files of other programs (nnU-Net, SAM-Med3D, BrainSegFounder / MONAI trainers) are read by
`load_foreign_checkpoint`, which unpickles Python objects only with --trust-pickle.
"""

import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from shared.atomic import atomic_path, remove_stale_temps
from shared.cli import RESUME_EXTENDABLE_FLAGS, RESUME_MUTABLE_FLAGS, check_output_dir
from shared.errors import InputError
from shared.harness import set_rng_state

_PLAIN_TYPES = (torch.Tensor, bool, int, float, str, type(None))

# Trainers of other programs store metrics as numpy floats (nnU-Net's `logging` and `_best_ema`, BrainSegFounder's
# `best_acc`). Rebuilding a numpy scalar from its dtype and raw bytes runs no code from the file, so its constructor
# and the dtypes are allowed with weights_only=True, under both module names (numpy 1.x pickles say numpy.core,
# numpy 2 numpy._core). ObjectDType is left out: an object scalar is an arbitrary Python object.
_NP_SCALAR = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
NUMPY_SAFE_GLOBALS = [(_NP_SCALAR, "numpy.core.multiarray.scalar"), (_NP_SCALAR, "numpy._core.multiarray.scalar"),
                      np.dtype] + [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")
                                   and n != "ObjectDType"]  # fmt: skip
_NUMPY_SAFE_NAMES = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in NUMPY_SAFE_GLOBALS}


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
        raise InputError(f"{path}: not a readable checkpoint ({_first_line(err)}).") from err
    if not isinstance(payload, dict):
        raise InputError(f"{path}: checkpoint holds a {type(payload).__name__}, expected a dict.")
    kind = payload.get("kind")
    if expect_kind is not None and kind is not None and kind != expect_kind:
        raise InputError(f"{path} is a {kind} checkpoint, expected {expect_kind}.")
    return payload


def _first_line(err: Exception) -> str:
    """`Type: first line of the message` of an exception, for a one-sentence refusal."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _pickled_globals(path, err: Exception) -> list[str]:
    """The globals outside torch's and the numpy allowlist that `path` pickles; [] when none can be named."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip archive: a legacy torch.save file (named by the error), or no torch file at all
        names = re.findall(r"Unsupported global: GLOBAL (\S+)", str(err))
    return sorted({n for n in names if n not in _NUMPY_SAFE_NAMES})


def load_foreign_checkpoint(path, *, trust_pickle: bool, flag: str,
                            remedy: str = "pass --trust-pickle if you trust its origin"):  # fmt: skip
    """Read a checkpoint file of another program, which may pickle Python objects besides the tensors.

    First with `torch.load(weights_only=True)`, numpy scalars and dtypes allowed (`NUMPY_SAFE_GLOBALS`, through
    `torch.serialization.safe_globals`). A file that pickles anything else is refused, naming those globals,
    unless `trust_pickle` (the --trust-pickle flag): then it is read with `weights_only=False`, which runs the
    file's pickle code, so only for files whose origin the user trusts.

    Args:
        path: the file.
        trust_pickle: unpickle what weights_only refuses.
        flag: the flag (or words) that named the file, for messages ("--input", "nnU-Net checkpoint").
        remedy: the end of the refusal of a pickled file: what the user may do.
    Returns:
        whatever the file holds (the caller checks it is the dict it expects), tensors on the CPU.
    Raises:
        InputError: the file is missing, empty, no readable torch file, pickles objects without `trust_pickle`,
            or its pickle needs a Python module that is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag} {path}: file not found.")
    if path.stat().st_size == 0:
        raise InputError(f"{flag} {path}: file is empty.")
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = err  # a global outside the allowlists (or a damaged pickle)
    except Exception as err:  # truncated zip, not a torch file
        raise InputError(f"{flag} {path}: not a readable checkpoint ({_first_line(err)}).") from err
    if not trust_pickle:
        names = _pickled_globals(path, refused)
        if not names:
            raise InputError(f"{flag} {path}: not a readable checkpoint ({_first_line(refused)}).") from refused
        raise InputError(f"{flag} {path} holds pickled Python objects ({', '.join(names)}), which are not loaded "
                         f"because unpickling runs code; {remedy}.") from refused  # fmt: skip
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as err:  # a pickled class whose module is not installed
        raise InputError(f"{flag} {path}: unpickling it needs the Python module {err.name!r}; install it, or save "
                         "the model's state_dict() where it was trained.") from err  # fmt: skip
    except Exception as err:
        raise InputError(f"{flag} {path}: not a readable checkpoint ({_first_line(err)}).") from err


def strip_prefix(state_dict: Mapping, prefix: str = "module.") -> dict:
    """Remove `prefix` from the keys that start with it (e.g. DDP's "module." in foreign checkpoints).

    Keys without the prefix are kept as they are; the order of the keys is preserved.
    """
    return {(key[len(prefix) :] if key.startswith(prefix) else key): value for key, value in state_dict.items()}


def describe_checkpoint(ckpt: Mapping) -> str:
    """What a loaded checkpoint dict is, in words: "a mome checkpoint", "a plain state_dict (tensors only)", ..."""
    if ckpt.get("kind") is not None:
        return f"a {ckpt['kind']} checkpoint"
    if ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return f"a plain state_dict ({len(ckpt)} tensors, no kind, config or flags)"
    keys = sorted(str(k) for k in ckpt)
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    return f"a checkpoint that records no kind (keys: {shown or 'none'})"


def require_run_checkpoint(
    ckpt: Mapping, path, *, kind: str | Iterable[str], hint: str | None = None, keys: Iterable[str] = ("model",)
) -> Mapping:
    """Refuse, with one sentence, a checkpoint that is not a run checkpoint of `kind` holding `keys`.

    Catches a plain state_dict (or another program's file) passed where a training run's checkpoint is expected,
    which would otherwise fail later with `KeyError: 'config'`.

    Args:
        ckpt: the dict from `load_checkpoint`.
        path: its file, for the message.
        kind: the accepted kind, or several (e.g. a package's general, expert and MoE checkpoints).
        hint: what to pass instead, ending the sentence; default: "pass a checkpoint.pt written by its training
            CLI". E.g. "to use its weights, pass --config NAME to name its architecture".
        keys: entries the caller reads (a checkpoint of `kind` that lacks one is truncated or from another version).
    Returns:
        `ckpt`, unchanged.
    """
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    wanted = " or ".join(kinds)
    hint = hint or "pass a checkpoint.pt written by its training CLI"
    if ckpt.get("kind") is not None and ckpt["kind"] not in kinds:
        raise InputError(f"{path} is a {ckpt['kind']} checkpoint, expected {wanted}.")  # as load_checkpoint says
    if ckpt.get("kind") is None:
        raise InputError(f"{path} is {describe_checkpoint(ckpt)}, not a {wanted} run checkpoint; {hint}.")
    missing = [key for key in keys if key not in ckpt]
    if missing:
        raise InputError(f"{path}: this {ckpt['kind']} checkpoint lacks {missing} (written by another version?).")
    return ckpt


def load_run_checkpoint(
    path, *, kind: str | Iterable[str], map_location="cpu", hint: str | None = None, keys: Iterable[str] = ("model",)
) -> dict:
    """`load_checkpoint` followed by `require_run_checkpoint`: a run checkpoint of `kind` holding `keys`."""
    return require_run_checkpoint(load_checkpoint(path, map_location=map_location), path, kind=kind, hint=hint,
                                  keys=keys)  # fmt: skip


# ----------------------------------------------------------------------------- one run, resumed as the same run


def _plain(value):
    """`value` as stored in a checkpoint: tuples as lists, paths as str (weights_only loads both back)."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def plain_args(args) -> dict:
    """vars(args) as plain values for `save_checkpoint(..., args=plain_args(args))` and `check_same_run`."""
    return {key: _plain(value) for key, value in vars(args).items()}


def _same(a, b) -> bool:
    """Equal flag values; strings are also equal when they name the same path (`data/X/` and `data/X`)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, str):
        return a == b or os.path.normpath(a) == os.path.normpath(b)
    return a == b


def _shown(value) -> str:
    """A flag value as typed on the command line."""
    if isinstance(value, list):
        return " ".join(_shown(v) for v in value) or "(empty)"
    return "(not given)" if value is None else str(value)


def _dest(flag: str) -> str:
    """argparse's attribute name of a flag: "--stop-after" -> "stop_after"."""
    return flag.lstrip("-").replace("-", "_")


def check_same_run(stored: Mapping | None, args, *, path, mutable: Iterable[str] = RESUME_MUTABLE_FLAGS,
                   extendable: Iterable[str] = RESUME_EXTENDABLE_FLAGS) -> None:  # fmt: skip
    """Refuse to resume a run with flags that differ from those stored in its checkpoint, listing every one.

    Call it after the CLI's own normalisation of `args` (e.g. canonical modality names), which the first call
    stored too. Flags known on one side only (added or removed by a newer version of the code) are not compared.

    Args:
        stored: `ckpt["args"]` (a plain dict of the first call's flags), or None when the checkpoint has none.
        args: this call's argparse Namespace.
        path: the checkpoint, for the message.
        mutable: flags that may change freely (`shared.cli.RESUME_MUTABLE_FLAGS`).
        extendable: flags that may only grow (`--epochs`, `--steps`: a longer schedule extends the run).
    Raises:
        InputError: `stored` is missing, or flags differ: "--modality: T1 -> FLAIR, --lr: 0.01 -> 0.1".
    """
    if not isinstance(stored, Mapping):
        raise InputError(f"{path} records no training flags (args), so --resume cannot check that it continues the "
                         "same run; start a new --out folder.")  # fmt: skip
    free = {_dest(f) for f in mutable}
    growing = {_dest(f) for f in extendable}
    current = plain_args(args)
    differences = []
    for dest in sorted(set(stored) & set(current) - free):
        before, after = _plain(stored[dest]), current[dest]
        if _same(before, after):
            continue
        flag = "--" + dest.replace("_", "-")
        if dest in growing and isinstance(before, int) and isinstance(after, int) and after > before:
            continue
        note = " (may only grow)" if dest in growing else ""
        differences.append(f"{flag}: {_shown(before)} -> {_shown(after)}{note}")
    if differences:
        raise InputError(f"{path} is a run with other flags, and --resume only continues the same run: "
                         f"{', '.join(differences)} (repeat the first call's values or pick a new --out).")  # fmt: skip


def prepare_run_dir(out, *, resume: bool, args=None, kind: str | Iterable[str] | None = None,
                    is_main: bool = True, checkpoint: str = "checkpoint.pt", flag: str = "--out",
                    map_location="cpu") -> dict | None:  # fmt: skip
    """Start or resume a training run's folder, before any work: the one place every training CLI calls.

    - `out` must be a folder or creatable as one (not created here; the first write creates it);
    - without --resume, a folder that already holds a checkpoint is refused (it would be overwritten);
    - with --resume and a checkpoint: it is loaded, checked to be a `kind` run checkpoint, and, with `args`,
      checked to be the same run (`check_same_run`); with --resume and no checkpoint, the run starts fresh;
    - rank 0 removes the temp files a killed save left (`shared.atomic.remove_stale_temps`, sub-folders too).

    Args:
        out: the run folder (--out).
        resume: --resume was given.
        args: this call's flags, compared with the checkpoint's; None skips the comparison.
        kind: accepted checkpoint kind(s); None skips the kind check.
        is_main: rank 0 (only it removes files).
        checkpoint: the checkpoint's file name in `out`.
        flag: the flag naming `out`, for messages.
        map_location: where the checkpoint's tensors are loaded (`restore_run` moves them to the model).
    Returns:
        the checkpoint dict to pass to `restore_run`, or None for a fresh start.
    """
    out = check_output_dir(out, flag)
    ckpt_path = out / checkpoint
    if ckpt_path.exists() and not resume:
        raise InputError(f"{flag} {out} already holds {checkpoint}; pass --resume to continue it or pick a new folder.")
    if is_main:
        removed = remove_stale_temps(out)
        if removed:
            print(f"removed {len(removed)} temp file(s) of an interrupted save in {out}")
    if not (resume and ckpt_path.exists()):
        return None
    ckpt = load_checkpoint(ckpt_path, map_location=map_location)
    if kind is not None:
        require_run_checkpoint(ckpt, ckpt_path, kind=kind, keys=("model", "optimizer", "scaler", "rng"))
    if args is not None:
        check_same_run(ckpt.get("args"), args, path=ckpt_path)
    return ckpt


def restore_run(source, *, kind: str, model, optimizer, scaler, generator, device, args=None) -> dict:
    """Load a training run's checkpoint into model, optimizer, grad scaler and every RNG (`--resume`).

    Args:
        source: the run's checkpoint file, or the dict `prepare_run_dir` returned (not read twice); written by
            `save_checkpoint` with `kind`, `model`, `optimizer`, `scaler`, `rng` (and `args`).
        kind: the expected checkpoint kind (another kind, or a plain state_dict, is refused with InputError).
        generator: the data pipeline's numpy Generator, restored with the other RNGs.
        device: where a checkpoint file's tensors are loaded.
        args: this call's flags: refuse a checkpoint of another run (`check_same_run`); None skips the check.
    Returns:
        the checkpoint dict (its step or epoch tells where to continue).
    """
    path = "the resumed checkpoint" if isinstance(source, Mapping) else source
    ckpt = source if isinstance(source, Mapping) else load_checkpoint(source, map_location=device)
    require_run_checkpoint(ckpt, path, kind=kind, keys=("model", "optimizer", "scaler", "rng"))
    if args is not None:
        check_same_run(ckpt.get("args"), args, path=path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], generator=generator)
    return ckpt
