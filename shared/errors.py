"""The one exception type for bad user input; `shared.cli.run_cli` turns it into one sentence and exit status 2."""


class InputError(ValueError):
    """Bad input from the user (a file, an argument, a dataset): the message is one sentence naming it."""
