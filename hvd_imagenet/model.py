"""torchvision ResNet with the paper's initialization and weight-decay groups (Goyal et al. Sec. 2.3, 5.1)."""
from __future__ import annotations

import torch
import torchvision.models
from torchvision.models.resnet import BasicBlock


# The small-image ResNets of He et al. (2016, Sec. 4.2): 6m+2 layers, m basic blocks in each of 3 stages.
SMALL_IMAGE_RESNETS = {"cifar_resnet8": 1, "cifar_resnet14": 2, "cifar_resnet20": 3}


def resnet_names() -> list[str]:
    """Every ResNet constructor torchvision ships (resnet18..152, resnext*, wide_resnet*), and the small-image
    ResNets below: --arch's choices."""
    return sorted([name for name in torchvision.models.resnet.__all__ if name[0].islower()] + [*SMALL_IMAGE_RESNETS])


def build_model(arch: str, num_classes: int, zero_init_residual: bool) -> torch.nn.Module:
    """A freshly initialized ResNet: a torchvision one by name, or a small-image one (SMALL_IMAGE_RESNETS).

    zero_init_residual: gamma = 0 in the last BN of each residual block, so every block starts as the identity
    (Sec. 5.1, "Batch normalization"); torchvision implements exactly this (bn3 of Bottleneck, bn2 of BasicBlock).
    """
    if arch in SMALL_IMAGE_RESNETS:
        return SmallImageResNet(SMALL_IMAGE_RESNETS[arch], num_classes, zero_init_residual)
    constructor = getattr(torchvision.models, arch)
    return constructor(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)


class SmallImageResNet(torch.nn.Module):
    """He et al.'s CIFAR ResNet (2016, Sec. 4.2) from torchvision's BasicBlock: a 3x3 stem of 16 channels, stages
    of 16, 32, 64 channels at full, 1/2 and 1/4 resolution, global average pooling, one linear layer. Shortcuts
    that change shape are 1x1 convolutions with BN (torchvision's, He's option B). The study's stand-in for
    ResNet-50: 0.08-0.27M parameters instead of 25.6M, so a 2-core CPU runs thousands of steps an hour."""

    def __init__(self, blocks_per_stage: int, num_classes: int, zero_init_residual: bool):
        super().__init__()
        nn = torch.nn
        layers = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)]
        channels = 16
        for stage, width in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                shortcut = None
                if stride != 1 or channels != width:
                    shortcut = nn.Sequential(nn.Conv2d(channels, width, 1, stride=stride, bias=False),
                                             nn.BatchNorm2d(width))
                layers.append(BasicBlock(channels, width, stride, shortcut))
                channels = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():  # torchvision's ResNet initialization
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images).mean(dim=(2, 3)))


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
