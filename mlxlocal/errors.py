"""The one error type a user can cause; the CLI prints it as a single line."""


class MlxLocalError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do."""
