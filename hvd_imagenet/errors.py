"""The one exception type for problems a user can fix: a bad flag, a missing or malformed data set."""


class UserError(ValueError):
    """The CLI prints it as one line on stderr and exits with status 2, without a traceback."""
