"""Metrics as sums and counts on the device, reduced across ranks once per epoch; rank-0 writers.

Accuracy is total correct / total images over all ranks, never a mean of per-batch or per-rank means
(those weight a short last batch or a smaller shard like a full one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# An epoch's sums: a batch's four, then a training step's gradient noise probe (noise_scale.py; zeros if none)
SUMS = ("loss_sum", "top1_correct", "top5_correct", "count", "grad_sq_small", "grad_sq_big", "noise_probes")


class EpochSums:
    """SUMS of one epoch: this rank's since the last fold, on the device, plus `carried`, the sums of all ranks
    up to the last fold (the same on every rank; what a checkpoint or an elastic commit keeps of a partial
    epoch; one written before the noise probe has its first four)."""

    def __init__(self, device: torch.device, carried: tuple[float, ...] | None = None):
        carried = tuple(carried or ())
        self.carried = carried + (0.0,) * (len(SUMS) - len(carried))
        self.local = torch.zeros(len(SUMS), dtype=torch.float64, device=device)

    @staticmethod
    @torch.no_grad()
    def of_batch(output: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        top5 = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = top5.eq(target[:, None])
        return torch.stack(
            [
                loss.detach().double() * target.numel(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                target.new_full((), target.numel(), dtype=torch.float64),  # a fill kernel: no host-to-device copy
            ]
        )

    def add(self, totals: torch.Tensor) -> None:
        """A batch's four sums (of_batch), or a step's SUMS."""
        self.local[: totals.numel()] += totals

    def fold(self, name: str) -> tuple[float, ...]:
        """Add every rank's sums since the last fold to `carried` (a collective: every rank must call it)."""
        from . import comm  # here, not at the top: the step unit (step.py) imports this module without Horovod

        reduced = comm.allreduce_sum(self.local.cpu(), name=name).tolist()  # sync point
        self.carried = tuple(a + b for a, b in zip(self.carried, reduced))
        self.local.zero_()
        return self.carried

    def reduce(self, name: str) -> dict:
        """The epoch's loss and accuracies in % over all ranks (a collective: every rank must call it)."""
        return summarize(self.fold(name))


def summarize(sums: tuple[float, ...]) -> dict:
    """Loss and accuracies in % from the sums' first four (loss_sum, top1_correct, top5_correct, count)."""
    loss_sum, top1, top5, count = sums[:4]
    if count == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "images": 0}
    return {"loss": loss_sum / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "images": int(count)}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunWriter:
    """config.json, metrics.jsonl and TensorBoard events in the run directory. Rank 0 only."""

    def __init__(self, output: Path, config: dict, keep_epochs: int):
        """keep_epochs: epochs already done (on resume); later records, from a run that died after writing
        them but before its checkpoint, are dropped so they are not reported twice."""
        from torch.utils.tensorboard import SummaryWriter

        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / "config.json", json.dumps(config, indent=2) + "\n")
        self.metrics_path = output / "metrics.jsonl"
        kept = [r for r in read_metrics(output) if r["epoch"] <= keep_epochs]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self.tensorboard = SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=keep_epochs + 1)

    def epoch(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "epoch" and value == value:  # skip NaN
                self.tensorboard.add_scalar(key, value, record["epoch"])
        self.tensorboard.flush()

    def close(self) -> None:
        self.tensorboard.close()


def read_metrics(output: Path) -> list[dict]:
    path = output / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def format_table(records: list[dict]) -> str:
    """The per-epoch table the trainer prints at the end of a run."""
    header = (
        f"{'epoch':>5} {'lr':>8} {'train loss':>10} {'train top1':>10} {'val loss':>8} {'val top1':>8} "
        f"{'val top5':>8} {'img/s':>8} {'sec':>6}"
    )
    rows = [header]
    for r in records:
        val = (
            f"{r['val_loss']:>8.4f} {r['val_top1']:>8.2f} {r['val_top5']:>8.2f}"
            if r.get("val_top1") is not None
            else f"{'-':>8} {'-':>8} {'-':>8}"
        )  # an epoch not evaluated (--eval-every)
        rows.append(
            f"{r['epoch']:>5} {r['lr']:>8.4f} {r['train_loss']:>10.4f} {r['train_top1']:>10.2f} {val} "
            f"{r['images_per_sec']:>8.1f} {r['epoch_seconds']:>6.1f}"
        )
    return "\n".join(rows)
