"""The base of every error a user can cause; the command line turns these into one-line messages."""


class ClipsearchError(Exception):
    """Something the user can fix: bad input, a missing file, an inconsistent artifact."""
