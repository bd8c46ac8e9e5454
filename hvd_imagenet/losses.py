"""--loss: the training loss, one entry per loss. No torch at import: config validation and `--help` read
LOSSES as is; a loss's function is imported and called when a run builds its step (train.build_step).

An entry names a `build(config) -> torch.nn.Module` function; the module's forward(logits, labels) is the
micro-batch's mean loss. The step divides it by the passes per step and Horovod averages the gradients over the
ranks: the loss normalized by the whole minibatch kn (Goyal et al. Sec. 3, Remark 3). Validation's loss stays
plain cross-entropy whatever this is (step.evaluate), so val numbers compare across losses.
To add one: its function (here, or in a module of its own) and a line in LOSSES (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import resolve


@dataclass(frozen=True)
class LossEntry:
    build: str  # "module:function"
    help: str


LOSSES: dict[str, LossEntry] = {
    "cross-entropy": LossEntry(
        "hvd_imagenet.losses:cross_entropy", "softmax cross-entropy (the paper's), with --label-smoothing"
    ),
}


def cross_entropy(config):
    import torch

    return torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)


def build_loss(config):
    """The training loss `config.loss` names."""
    return resolve(LOSSES[config.loss].build)(config)
