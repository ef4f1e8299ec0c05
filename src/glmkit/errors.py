"""The one exception type that means "the user can fix this"; the CLI prints it without a traceback."""


class GlmkitError(Exception):
    """A problem with the user's input or environment, explained in the message."""


def first_line(exc: BaseException) -> str:
    """The first line of another library's exception message: enough to act on, without its essay."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
