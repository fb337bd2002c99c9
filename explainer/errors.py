"""The one exception type a user ever sees as a message instead of a traceback."""


class ExplainerError(Exception):
    """A user-facing problem: bad input, a locked file, an unreachable endpoint.

    The message names the input and the fix. `cli.main` prints it on one line and
    exits 2; any other exception is a bug and keeps its traceback.
    """
