"""One exception type for bad user input, and the CLI wrapper that turns it into one sentence and exit 2."""

import sys
from collections.abc import Callable


class InputError(ValueError):
    """Bad input from the user (a file, an argument, a dataset): the message is one sentence naming it."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a CLI `main()`: an `InputError` prints `error: <sentence>` on stderr and exits with status 2; a
    `FloatingPointError` (a NaN/Inf training loss, see `shared.harness.check_finite_loss`) exits with status 3.

    After `main()` returns, a torchrun process leaves its process group here rather than inside `main()`:
    only once `main()`'s frame is gone are its DDP-wrapped models freed before the group is destroyed.
    """
    from shared.harness import cleanup_distributed  # harness imports this module

    try:
        main()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    cleanup_distributed()
