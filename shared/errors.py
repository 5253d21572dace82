"""The one exception type for bad user input; `shared.cli.run_cli` turns it into one sentence and exit status 2."""

LIST_LIMIT = 10  # names a message lists before "and N more"


class InputError(ValueError):
    """Bad input from the user (a file, an argument, a dataset): the message is one sentence naming it."""


def short_list(names) -> str:
    """Sorted names joined by commas, cut after LIST_LIMIT so an InputError stays one readable sentence.

    Example: short_list(["c", "a", "b"]) -> "a, b, c"; twelve names -> the first ten "and 2 more".
    """
    names = sorted(str(n) for n in names)
    text = ", ".join(names[:LIST_LIMIT])
    return text + (f" and {len(names) - LIST_LIMIT} more" if len(names) > LIST_LIMIT else "")
