"""One exception type for every error a user can cause (torch-free).

The command-line tools catch :class:`LitedgeError` and print its message as one line,
then exit with status 2; anything else is a bug and keeps its traceback.
"""


class LitedgeError(Exception):
    """A problem with the user's input: says what is wrong, what was expected, how to fix it."""
