"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class SeedError(Exception):
    """Bad input or state a user can fix (a missing file, a wrong config field, a foreign cache).

    The message names the file, key or field and says what was expected.
    """
