"""The tool's own exception types: problems a user can fix, and a run stopped because training diverged."""


class UserError(ValueError):
    """The CLI prints it as one line on stderr and exits with status 2, without a traceback."""


class Diverged(RuntimeError):
    """The averaged gradients were NaN or inf (train.py). The CLI prints one line naming the step and the last
    good checkpoint and exits with EXIT_STATUS, so a launcher or a requeue script can tell it from bad input."""

    EXIT_STATUS = 3
    RECORD_FILE = "diverged.json"  # rank 0 writes it into the run directory: where, and the message
