"""--optimizer sgd: the paper's. Momentum 0.9 (Nesterov by default), weight decay lambda on the weights only:
"we do not apply weight decay on the learnable BN coefficients" (Goyal et al. Sec. 5.1; model.parameter_groups)."""

from __future__ import annotations

import torch

from ..model import parameter_groups


def build(config, model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        parameter_groups(model, config.weight_decay, config.bn_weight_decay),
        lr=0.0,
        momentum=config.momentum,
        nesterov=config.nesterov,
    )
