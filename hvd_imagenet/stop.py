"""A stop request: SLURM's warning signal or scancel reaches each rank at its own moment; the ranks agree on it
at fixed steps, so every rank stops at the same one (train.Trainer, then a checkpoint there and exit 0)."""

from __future__ import annotations

import signal

from . import comm

CHECK_EVERY = 10  # steps between the ranks' agreement on a stop request (one 1-element allreduce)
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """SIGUSR1 (SLURM's warning before the time limit, `#SBATCH --signal=USR1@120`) or SIGTERM (scancel, the
    limit itself; horovodrun on a failure) asks the job to stop. A signal reaches the ranks at different
    moments, so they agree at fixed steps (every CHECK_EVERY steps and after each epoch) whether any rank
    got one; then all stop at that step, rank 0 writes a checkpoint, and every rank exits 0."""

    def __init__(self):
        self.received = 0
        for number in SIGNALS:
            signal.signal(number, self._receive)

    def _receive(self, number, frame) -> None:
        self.received = max(self.received, number)

    def agreed(self) -> str | None:
        """The signal's name if any rank has received one (a collective: every rank calls it at the same step)."""
        number = comm.allreduce_max(self.received, name="stop_request")
        return signal.Signals(number).name if number else None
