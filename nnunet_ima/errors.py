"""The error type that command-line entry points turn into a message and a non-zero exit code."""


class UserInputError(ValueError):
    """Bad input from the user (a path, a dataset id, an option): the message says what and how to fix it."""
