"""--optimizer: the registry, one entry per optimizer, one module each. No torch at import: `--help`, config
validation and `schedule` read it as is; an entry's module is imported when a run builds its optimizer.

An entry names a `build(config, model) -> torch.optim.Optimizer` function. `build_optimizer` is the one place
train and bench-train make an optimizer (lr 0: the schedule sets it before every step, step.TrainStep). Horovod
wraps whatever it returns (comm.distributed_optimizer), so an optimizer sees the gradients averaged over all
ranks, and its state goes into the one checkpoint format through state_dict().
To add one: a module here with its `build`, and a line below (docs/architecture.md, "Extension points").
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import resolve


@dataclass(frozen=True)
class OptimizerEntry:
    build: str  # "module:function"
    help: str

    def builder(self):
        return resolve(self.build)


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "sgd": OptimizerEntry(
        "hvd_imagenet.optimizers.sgd:build",
        "SGD with (Nesterov) momentum, no weight decay on BN/bias (Goyal et al. Sec. 5.1)",
    ),
    "lars": OptimizerEntry(
        "hvd_imagenet.optimizers.lars:build",
        "LARS (You et al. 2017) as MLPerf's ResNet-50: a per-layer trust ratio; BN/bias skipped",
    ),
}


def build_optimizer(config, model):
    """The optimizer `config.optimizer` names, over `model`'s parameters, lr 0 until the schedule sets it."""
    return OPTIMIZERS[config.optimizer].builder()(config, model)
