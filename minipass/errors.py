"""The one exception type the command line turns into a short message instead of a traceback."""


class MinipassError(Exception):
    """An error the user can fix; the CLI prints its message and exits 2."""
