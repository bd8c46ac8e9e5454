"""A step watchdog on every rank: a rank that makes no progress for `--hang-timeout` seconds ends itself.

A rank that hangs without dying (a stuck file system, a driver fault, a deadlock; from outside: alive and
silent) leaves every other rank waiting in a collective. Under Gloo, Horovod's socket timeout ends the job;
under MPI (srun --mpi=pmix, mpirun) the negotiation blocks inside an MPI collective, Horovod's stall inspector
never runs, and the job holds its GPUs until its time limit. So each rank keeps the time of its last
progress (an optimizer step, an evaluation batch, a checkpoint written, start-up done), and a daemon thread
checks it; past the timeout it writes one line to stderr and ends the process with EXIT_STATUS. The launcher
(mpirun, srun --kill-on-bad-exit, horovodrun) sees a rank exit non-zero and ends the job, the stopped rank
included (SIGKILL ends a stopped process).

The healthy ranks are the ones that fire: they wait on the silent one. The silent rank cannot act, but the
launcher kills it. A progress mark is a few attribute stores: no collective, no host sync. The thread runs
while the main thread waits in Horovod's synchronize (it releases the GIL; checked on both controllers).
The line is written with os.write and nothing else is touched on the way out: on a hung file system, even
the log file or the checkpoint directory could block the watchdog itself.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

EXIT_STATUS = 4  # distinct from a user error (2), a divergence (3) and a crash (1)
DEFAULT_TIMEOUT = 300.0  # seconds; why this value: docs/reliability.md, "Choosing --hang-timeout"


class Watchdog:
    """Call the marks as the run goes. start() starts the thread (timeout 0: none), which lives as long as the
    process: it also ends a rank whose exit hangs (Horovod's shutdown waiting on a silent peer)."""

    def __init__(self, timeout: float, checkpoints: str, rank: Callable[[], int | None]):
        self.timeout, self.checkpoints, self.rank = timeout, checkpoints, rank
        self.phase = "start-up"
        self.last_progress = time.monotonic()
        self.last_step: tuple[int, int, int] | None = None  # (epoch, step, steps per epoch), 0-based
        self.resume_from: str | None = None  # the newest checkpoint this rank knows to be complete
        self.pending: str | None = None  # a checkpoint rank 0 may still be writing (seen from another rank)
        self.paused = False
        self.thread = threading.Thread(target=self.watch, name="hang-watchdog", daemon=True)

    def start(self) -> Watchdog:
        if self.timeout > 0:
            self.thread.start()
        return self

    # --- Progress marks: called by the trainer, each a few attribute stores. ---
    def step_done(self, epoch: int, step: int, steps: int) -> None:
        """Optimizer step `step` of `epoch` (0-based) completed: its allreduce returned, so every rank got
        that far (rank 0 writes checkpoints in the background: a step says nothing of them)."""
        self.last_progress = time.monotonic()
        self.phase, self.last_step = "training", (epoch, step, steps)

    def progress(self, phase: str) -> None:
        """Progress made, and this rank now in `phase`: "training" (an epoch begins), "evaluation" (a batch),
        "checkpoint", "epoch end" (the ranks' agreement on signals after an epoch's checkpoint), "shutdown"."""
        self.last_progress = time.monotonic()
        self.phase = phase

    def checkpoint_saved(self, path: str, complete: bool) -> None:
        """The checkpoint at `path` was started (complete=False: rank 0 writes it in the background; another
        rank never learns when it is done) or is complete (rank 0's writer finished it, or it was loaded to
        resume). Called from rank 0's writer thread too: attribute stores only."""
        self.last_progress = time.monotonic()
        if complete:
            self.resume_from, self.pending = path, None
        else:
            self.pending = path

    def started_from(self, path) -> None:
        """The checkpoint this run resumed from (None: a fresh start)."""
        if path:
            self.checkpoint_saved(str(path), complete=True)

    def pause(self) -> None:
        """Not counting: Horovod's elastic driver re-forms the ring (bounded by horovodrun --elastic-timeout)."""
        self.paused = True

    def resume(self) -> None:
        self.progress(self.phase)
        self.paused = False

    # --- The thread. ---
    def watch(self) -> None:
        interval = min(5.0, max(0.2, self.timeout / 20))
        while True:
            time.sleep(interval)
            silent = time.monotonic() - self.last_progress
            if silent > self.timeout and not self.paused:
                os.write(2, (self.message(silent) + "\n").encode())
                os._exit(EXIT_STATUS)  # at once: no atexit, no flush, no Horovod shutdown (it would wait too)

    def message(self, silent: float) -> str:
        rank = self.rank()
        who = f"rank {rank}" if rank is not None else "a rank (before Horovod started)"
        return (
            f"hvd-imagenet train: {who} (host {socket.gethostname()}, pid {os.getpid()}): no progress for "
            f"{silent:.0f} s (--hang-timeout {self.timeout:g}) {self.where()}; ending this rank (exit status "
            f"{EXIT_STATUS}) so that the launcher ends the job; {self.restart_hint()}"
        )

    def where(self) -> str:
        if self.last_step is None:
            return f"in {self.phase}, before the first training step completed"
        epoch, step, steps = self.last_step
        return f"in {self.phase} (the last step completed: {step + 1}/{steps} of epoch {epoch + 1})"

    def restart_hint(self) -> str:
        if self.resume_from:
            return f"--resume continues from {self.resume_from}"
        if self.pending:
            return (
                f"--resume continues from the newest complete checkpoint in {self.checkpoints} "
                f"(rank 0 was writing {os.path.basename(self.pending)})"
            )
        return f"no checkpoint of this run is known to this rank yet ({self.checkpoints})"
