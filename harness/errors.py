"""The one-line failure: what went wrong and what to do, exit code 1, never a traceback."""


class HarnessError(SystemExit):
    """A failure the user can fix: exits with code 1 and one line saying what to do."""

    def __init__(self, message):
        super().__init__(f"prepare.py: {message}")


def first_line(e):
    """An exception as one line: its type and message, whitespace folded."""
    return " ".join(f"{type(e).__name__}: {e}".split())
