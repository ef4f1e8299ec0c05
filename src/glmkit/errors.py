"""The one exception type that means "the user can fix this"; the CLI prints it without a traceback."""


class GlmkitError(Exception):
    """A problem with the user's input or environment, explained in the message."""
