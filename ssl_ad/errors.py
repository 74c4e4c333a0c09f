"""The one exception type for mistakes in a user's input.

Entry points catch it, print its message once and exit non-zero; anything
else is a bug and keeps its traceback.
"""


class UserInputError(Exception):
    """Bad data dir, unknown data set, corrupt image, mismatched checkpoint, ..."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient."""
