"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class UserError(ValueError):
    """Bad input from the user (flags, files, checkpoints); the message says what was expected."""
