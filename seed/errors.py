"""The exception types a command reports on one line: ``SeedError`` (exit 2) and ``MachineError`` (exit 1)."""

import errno

# errno values of a read or write that failed for the machine's reasons (a disk, a connection), not the input's
_TRANSIENT = {errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EHOSTUNREACH,
              errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE}


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


def machine_failure(exc: BaseException) -> bool:
    """Whether an ``OSError`` is the machine's (a connection reset or refused, a time-out, a disk's I/O error),
    which a re-run may not meet, rather than the input's (a missing file, a directory given for a file)."""
    return isinstance(exc, (ConnectionError, TimeoutError)) or (isinstance(exc, OSError) and exc.errno in _TRANSIENT)
