"""Progress a person can follow.

EpochProgress, rank 0's progress within an epoch: a tqdm bar on a terminal; under a launcher (stdout a pipe or a
file, as horovodrun, mpirun and SLURM give it) a plain status line every `every` seconds that a person can tail:

    epoch 2/90 step 1200/5004 | loss 3.412 | lr 0.4210 | 2513.4 img/s | epoch ETA 0:01:31 | run ETA 2:14:05

(tqdm's carriage-return redraws arrive there as one endless line behind horovodrun's `[0]<stdout>:` prefix.)
Reading the loss is a host sync: it happens on rank 0 alone, only when a line or the bar is drawn.
WorkProgress: the same two forms for the long data commands (prepare-imagenet, pack, stage).
"""

from __future__ import annotations

import datetime
import sys
import threading
import time

from tqdm import tqdm

BAR_EVERY = 10  # steps between a terminal bar's loss/lr/img/s updates


class EpochProgress:
    def __init__(
        self,
        enabled: bool,
        epoch: int,
        epochs: int,
        first_step: int,
        steps: int,
        global_batch: int,
        every: float,
        terminal: bool | None = None,
    ):
        self.enabled, self.epoch, self.epochs, self.steps = enabled, epoch, epochs, steps
        self.first_step, self.global_batch, self.every = first_step, global_batch, every
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.start = self.last_line = time.perf_counter()
        self.bar = None
        if enabled and self.terminal:
            self.bar = tqdm(
                total=steps,
                initial=first_step,
                desc=f"epoch {epoch + 1}/{epochs}",
                unit="step",
                file=sys.stdout,
                dynamic_ncols=True,
                leave=False,
            )
        elif enabled:
            print(
                f"epoch {epoch + 1}/{epochs}: steps {first_step + 1}-{steps} of {steps}, kn={global_batch}", flush=True
            )

    def update(self, step: int, loss, lr: float) -> None:
        """After step `step` (0-based) of the epoch; `loss` a device tensor, read only when shown."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update()
            if step % BAR_EVERY == 0 or step == self.steps - 1:
                self.bar.set_postfix(
                    loss=f"{loss.item():.3f}",
                    lr=f"{lr:.4g}",  # host sync, rank 0 only
                    img_s=f"{self.images_per_sec(step, now):.1f}",
                )
        elif now - self.last_line >= self.every:
            self.last_line = now
            print(self.line(step, loss.item(), lr, now), flush=True)  # host sync, rank 0 only

    def images_per_sec(self, step: int, now: float) -> float:
        return (step + 1 - self.first_step) * self.global_batch / max(now - self.start, 1e-9)

    def line(self, step: int, loss: float, lr: float, now: float) -> str:
        seconds_per_step = (now - self.start) / (step + 1 - self.first_step)
        left_in_epoch = self.steps - step - 1
        left_in_run = left_in_epoch + (self.epochs - self.epoch - 1) * self.steps  # evaluation not counted
        return (
            f"epoch {self.epoch + 1}/{self.epochs} step {step + 1}/{self.steps} | loss {loss:.3f} | "
            f"lr {lr:.4g} | {self.images_per_sec(step, now):.1f} img/s | epoch ETA "
            f"{_duration(left_in_epoch * seconds_per_step)} | run ETA {_duration(left_in_run * seconds_per_step)}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class WorkProgress:
    """Progress of a long command (prepare-imagenet, pack, stage): a tqdm bar on a terminal; elsewhere (a batch
    job's log) a plain line every `every` seconds and one at the end, on stderr:

        pack: 412/1000 classes (41 %), 52.1 GB, 380.2 MB/s, ETA 0:04:10

    `update(count, size)` adds finished units (classes, images, shards) and bytes, from any thread."""

    def __init__(self, what: str, total: int, unit: str, every: float = 30.0, terminal: bool | None = None):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.done, self.bytes = 0, 0
        self.start = self.last_line = time.perf_counter()
        self.lock = threading.Lock()
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(total=total, desc=what, unit=unit, file=sys.stderr, dynamic_ncols=True) if terminal else None

    def update(self, count: int = 1, size: int = 0) -> None:
        with self.lock:
            self.done, self.bytes = self.done + count, self.bytes + size
            now = time.perf_counter()
            if self.bar is not None:
                self.bar.update(count)
                self.bar.set_postfix_str(
                    f"{self.bytes / 1e9:.1f} GB, {self.bytes / 1e6 / (now - self.start):.1f} MB/s", refresh=False
                )
            elif now - self.last_line >= self.every:
                self.last_line = now
                print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        seconds = max(now - self.start, 1e-9)
        left = (self.total - self.done) * seconds / self.done if self.done else 0
        return (
            f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f} %), "
            f"{self.bytes / 1e9:.2f} GB, {self.bytes / 1e6 / seconds:.1f} MB/s, ETA {_duration(left)}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.done:
            print(self.line(time.perf_counter()), file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
