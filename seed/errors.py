"""The exception types a command reports on one line: ``SeedError`` (exit 2) and ``MachineError`` (exit 1)."""


class SeedError(Exception):
    """Bad input or state a user can fix (a missing file, a wrong config field, a foreign cache).

    The message names the file, key or field and says what was expected. Running again unchanged fails
    the same way, so the flow does not retry it.
    """


class MachineError(SeedError):
    """The machine's failure, not the input's: a process of the stage that ended without a mistake of its own
    to report (killed, out of memory, a crash), a disk that filled. What was finished is kept and a re-run
    continues from there, so the flow retries it once.
    """
