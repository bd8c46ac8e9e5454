"""torchvision ResNet with the paper's initialization and weight-decay groups (Goyal et al. Sec. 2.3, 5.1)."""
from __future__ import annotations

import torch
import torchvision.models


def build_model(arch: str, num_classes: int, zero_init_residual: bool) -> torch.nn.Module:
    """A freshly initialized ResNet.

    zero_init_residual: gamma = 0 in the last BN of each residual block, so every block starts as the identity
    (Sec. 5.1, "Batch normalization"); torchvision implements exactly this (bn3 of Bottleneck, bn2 of BasicBlock).
    """
    constructor = getattr(torchvision.models, arch)
    return constructor(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)


def parameter_groups(model: torch.nn.Module, weight_decay: float, bn_weight_decay: bool) -> list[dict]:
    """Two SGD groups: weights decayed by lambda, and BN gamma/beta and biases not decayed (Sec. 5.1:
    "we do not apply weight decay on the learnable BN coefficients"). The 1-D parameters of a ResNet are
    exactly those. With bn_weight_decay every parameter is decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 and not bn_weight_decay else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@torch.no_grad()
def weights_digest(model: torch.nn.Module) -> float:
    """One number that changes with any weight or BN statistic: equal on all ranks iff they hold one model
    (up to a vanishing chance). Position-weighted, so swapped tensors do not cancel."""
    total = 0.0
    for position, tensor in enumerate(model.state_dict().values(), start=1):
        values = tensor.detach().double()
        total += position * values.sum().item() + values.square().sum().item()
    return total
