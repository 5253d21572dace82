"""Command-line conventions of every entry point: parser, flag validators, JSON input files, output checks, run
flags, `run_cli`.

A CLI reads top-down::

    parser = make_parser(__doc__)                       # --help shows the raw docstring and every default
    parser.add_argument("--lr", type=positive_float, default=1e-2, help="initial learning rate")
    parser.add_argument("--out", required=True, help="metrics CSV")
    args = parser.parse_args(argv)                      # a bad flag: `error: <sentence>`, exit 2
    check_output_file(args.out, "--out", suffixes=(".csv",))   # before any work
    ...

    if __name__ == "__main__":
        run_cli(main)

The input conventions of predict and evaluate CLIs (`--input`, `--split`, `--cases`) are in `shared.inputs`.
"""

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from shared.errors import InputError

# --resume continues the same run: every flag must repeat the first call's value except these (checked by
# shared.checkpoint.check_same_run). --out names the folder the checkpoint is read from, so it may be spelt
# differently or moved.
RESUME_MUTABLE_FLAGS = ("--stop-after", "--workers", "--device", "--resume", "--compile", "--cache", "--out")
RESUME_EXTENDABLE_FLAGS = ("--epochs", "--steps")  # may only grow on --resume: the run is extended
RESUME_HELP = (
    "continue from OUT/checkpoint.pt exactly where it stopped (without one, start there); every other flag must "
    f"repeat the first call's value, except {', '.join(f for f in RESUME_MUTABLE_FLAGS if f != '--resume')} and "
    f"{' / '.join(RESUME_EXTENDABLE_FLAGS)} (only to extend the run)"
)


# ----------------------------------------------------------------------------- running a CLI


def run_cli(main: Callable[[], None]) -> None:
    """Run a CLI `main()`: an `InputError` prints `error: <sentence>` on stderr and exits with status 2; a
    `FloatingPointError` (a NaN/Inf training loss, see `shared.harness.check_finite_loss`) exits with status 3.

    After `main()` returns, a torchrun process leaves its process group here rather than inside `main()`:
    only once `main()`'s frame is gone are its DDP-wrapped models freed before the group is destroyed. A process
    group needs torch.distributed, so CLIs that never imported it (evaluate, phantom) skip loading torch here.
    """
    try:
        main()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    if "torch.distributed" in sys.modules:
        from shared.harness import cleanup_distributed

        cleanup_distributed()


# ----------------------------------------------------------------------------- parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and appends every flag's default to its help.

    Left out: defaults of required flags, None (not given; the help says what happens then) and help texts that
    already state their default in words ("(default: ...)"). Lists show as on the command line: `1 2 3`.
    """

    def _get_help_string(self, action):
        """The flag's help with " (default: X)" appended, unless a rule of the class docstring leaves it out."""
        help_text = action.help or ""
        default = action.default
        if (
            action.required
            or default is None
            or default is argparse.SUPPRESS
            or "%(default)" in help_text
            or "(default" in help_text
            or not action.option_strings
        ):
            return help_text
        shown = " ".join(str(v) for v in default) if isinstance(default, list | tuple) else str(default)
        return f"{help_text} (default: {shown.replace('%', '%%')})"  # help texts are %-formatted by argparse


def one_sentence(message: str) -> str:
    """argparse's error text as one sentence: `argument --lr: must be ...` -> `--lr: must be ....`"""
    text = " ".join(str(message).split())
    match = re.match(r"^argument ([^:]+): (.*)$", text)
    if match:
        text = f"{match[1]}: {match[2]}"
    return text if text.endswith((".", "!", "?")) else text + "."


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, `error: <sentence>`, and exit status 2.

    argparse's own errors print the whole usage block first; the project rule for bad input is one sentence.
    """

    def error(self, message):
        """Print `error: <sentence>` and exit 2 (argparse calls this for unknown, missing and invalid flags)."""
        self.exit(2, f"error: {one_sentence(message)}\n")


def make_parser(description: str | None, prog: str | None = None, epilog: str | None = None) -> Parser:
    """The parser of a CLI: raw description (a module docstring keeps its layout), every default in --help.

    Args:
        description: shown above the flags, line breaks kept (usually the module's `__doc__`).
        prog: program name for the usage line, e.g. "python -m shared.evaluate" (default: the script name).
        epilog: text after the flags.
    """
    return Parser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)


# ----------------------------------------------------------------------------- flag validators (argparse type=)


def _parse_number(text: str, kind: type) -> int | float:
    """`int(text)` or a finite `float(text)`, else an ArgumentTypeError that argparse prefixes with the flag."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def number_in(kind: type, what: str, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """An argparse `type=` that parses `kind` (int or float) and refuses values outside the bounds.

    Args:
        kind: int or float (floats must be finite: nan and inf are refused).
        what: the accepted values in words, for the message (`--tau: must be a probability in [0, 1], got 1.5`).
        low, high: bounds, None for none; `low_open` / `high_open` exclude the bound itself.
    Returns:
        a function str -> value, named after `what`.
    """

    def parse(text: str):
        """The number `text` holds, if it lies within the bounds."""
        value = _parse_number(text, kind)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what.replace(" ", "_")
    parse.__doc__ = f"argparse type: {what}."  # help(positive_int) says what it accepts
    return parse


positive_int = number_in(int, "a positive integer", low=1)
non_negative_int = number_in(int, "a non-negative integer", low=0)
positive_float = number_in(float, "a positive number", low=0.0, low_open=True)
non_negative_float = number_in(float, "a non-negative number", low=0.0)
probability = number_in(float, "a probability in [0, 1]", low=0.0, high=1.0)
fraction = number_in(float, "a fraction in (0, 1]", low=0.0, high=1.0, low_open=True)
overlap_fraction = number_in(float, "a fraction in [0, 1)", low=0.0, high=1.0, high_open=True)
fold_index = number_in(int, "a fold index >= 0, or -1 (train on every case)", low=-1)  # --fold of a training CLI
fold_count = number_in(int, "at least 2 folds", low=2)  # --folds


# ----------------------------------------------------------------------------- input files


def read_json_file(path, flag: str, what: str):
    """The JSON value of the file `flag` names; a missing or unreadable one is refused in one sentence.

    Args:
        path: the file.
        flag: the flag (or words) that named it, for messages ("--prompts").
        what: the kind of file, for messages ("JSON split file", "plans.json").
    Raises:
        InputError: "FLAG PATH: file not found." or "FLAG PATH: not a readable WHAT (reason)."
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{flag} {path}: file not found.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{flag} {path}: not a readable {what} ({err}).") from None


# ----------------------------------------------------------------------------- output paths (checked before work)


def _check_creatable(path: Path, flag: str) -> None:
    """Refuse `path` when its nearest existing ancestor is not a writable folder (nothing could be created)."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{flag} {path}: {ancestor} is a file, so nothing can be written below it.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: folder {ancestor} is not writable.")


def check_output_file(path, flag: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """Check, before any work, that `path` can be written as a file (an existing file is replaced at the end).

    Args:
        path: the output file.
        flag: the flag that named it, for the message.
        suffixes: accepted endings, e.g. (".csv",) or (".nii.gz", ".nii"); None accepts any.
    Returns:
        `path` as a Path.
    Raises:
        InputError: `path` is an existing folder, has another ending, or lies below a file or a read-only folder.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file name{_ending_hint(suffixes)}.")
    if suffixes and not path.name.endswith(tuple(suffixes)):
        raise InputError(f"{flag} {path}: file name must end in {' or '.join(suffixes)}.")
    _check_creatable(path, flag)
    return path


def _ending_hint(suffixes) -> str:
    """The ' ending in .csv' part of a message, or nothing when any ending is accepted."""
    return f" ending in {' or '.join(suffixes)}" if suffixes else ""


def check_output_dir(path, flag: str) -> Path:
    """Check, before any work, that `path` is a folder or can be created as one (it is not created here).

    Raises:
        InputError: `path` is an existing file, or lies below a file or a read-only folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file, expected a folder.")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {path}: folder is not writable.")
        return path
    _check_creatable(path, flag)
    return path


# ----------------------------------------------------------------------------- flags of every training CLI


def add_run_args(group, *, out_holds: str, unit: str, compiled: str = "the model") -> None:
    """Add --out, --resume, --stop-after, --seed, --device, --amp and --compile to a parser or argument group.

    Args:
        group: an `argparse.ArgumentParser` or one of its argument groups.
        out_holds: what the run folder holds, for the help text (e.g. "checkpoint.pt, log.csv").
        unit: what --stop-after counts ("epochs" or "steps").
        compiled: what --compile compiles, for the help text.
    """
    group.add_argument("--out", required=True, help=f"run folder: {out_holds}")
    group.add_argument("--resume", action="store_true", help=RESUME_HELP)
    group.add_argument("--stop-after", type=positive_int, help=f"stop after this many {unit} in this call "
                       "(time-limited jobs; continue with --resume)")  # fmt: skip
    group.add_argument("--seed", type=non_negative_int, default=0, help="random seed (each torchrun rank adds its "
                       "rank)")  # fmt: skip
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help=f"torch.compile {compiled} (default: on for CUDA, off on CPU)")  # fmt: skip
