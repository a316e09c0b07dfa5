"""The one exception a user sees."""


class OneshotError(ValueError):
    """A user-facing error: the CLI prints its one-line message and exits non-zero."""
