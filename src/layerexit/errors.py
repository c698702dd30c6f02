"""The one exception type users see: a plain-words message, printed on one line by the CLI."""


class LayerExitError(Exception):
    """A problem with the user's input or files, explained in plain words.

    The command line prints ``error: <message>`` and exits with status 2; no traceback.
    """
