"""The exception types for what a user can act on: the CLI prints their message on one line and exits 2."""


class SeedError(Exception):
    """Bad input or state a user can fix (a missing file, a wrong config field, a foreign cache).

    The message names the file, key or field and says what was expected. Running again unchanged fails
    the same way, so the flow does not retry it.
    """


class Crashed(SeedError):
    """A process a stage started ended without a mistake of its own to report (killed, out of memory, a
    crash). What it finished is kept and a re-run continues from there, so the flow retries it once.
    """
