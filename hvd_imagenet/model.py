"""torchvision ResNet with the paper's initialization and weight-decay groups (Goyal et al. Sec. 2.3, 5.1), and BN
over groups of a batch for virtual workers in one pass."""

from __future__ import annotations

import functools

import torch
import torchvision.models
from torchvision.models.resnet import BasicBlock

# The small-image ResNets of He et al. (2016, Sec. 4.2): 6m+2 layers, m basic blocks in each of 3 stages.
SMALL_IMAGE_RESNETS = {"cifar_resnet8": 1, "cifar_resnet14": 2, "cifar_resnet20": 3}


def resnet_names() -> list[str]:
    """Every ResNet constructor torchvision ships (resnet18..152, resnext*, wide_resnet*), and the small-image
    ResNets below: --arch's choices."""
    return sorted([name for name in torchvision.models.resnet.__all__ if name[0].islower()] + [*SMALL_IMAGE_RESNETS])


def build_model(arch: str, num_classes: int, zero_init_residual: bool, virtual_workers: int = 1) -> torch.nn.Module:
    """A freshly initialized ResNet: a torchvision one by name, or a small-image one (SMALL_IMAGE_RESNETS).

    zero_init_residual: gamma = 0 in the last BN of each residual block, so every block starts as the identity
    (Sec. 5.1, "Batch normalization"); torchvision implements exactly this (bn3 of Bottleneck, bn2 of BasicBlock).
    virtual_workers: V > 1 gives every BN layer GroupedBatchNorm2d's statistics, per group of 1/V of a batch.
    """
    norm_layer = functools.partial(GroupedBatchNorm2d, groups=virtual_workers)
    if arch in SMALL_IMAGE_RESNETS:
        return SmallImageResNet(SMALL_IMAGE_RESNETS[arch], num_classes, zero_init_residual, norm_layer)
    constructor = getattr(torchvision.models, arch)
    return constructor(
        weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual, norm_layer=norm_layer
    )


class GroupedBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are computed over each of `groups` consecutive equal parts
    of the batch ("ghost" batch norm): one forward/backward of V x n images normalizes as V workers of n would
    (Sec. 2.3: BN statistics over the n images of one worker, never over kn), so V virtual workers run in one
    pass at an efficient batch instead of V passes of n. The gradients equal V passes of n to float tolerance
    (tests/test_model.py).

    Running statistics: the V groups' means and variances enter running_mean/var as V consecutive momentum
    updates in group order, exactly what V passes of n would have left (closed form, on the device: no loop,
    no host sync); num_batches_tracked counts V. Parameters and buffers are BatchNorm2d's, so a checkpoint
    loads into a model with any number of groups. Eval mode and groups=1 are plain BatchNorm2d."""

    def __init__(self, num_features: int, groups: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        if self.momentum is None:  # a cumulative average would need each update's own factor
            raise ValueError("GroupedBatchNorm2d needs a momentum (not None)")
        self.groups = groups

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.groups == 1:
            return super().forward(x)
        if x.shape[0] % self.groups:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {self.groups} equal groups")
        grouped = x.unflatten(0, (self.groups, -1))  # (V, n, C, H, W): a view in NCHW and channels_last alike
        # Statistics in float32 at least (as cuDNN's BN under autocast): a copy for fp16/bf16 input only.
        exact = grouped.to(torch.promote_types(x.dtype, torch.float32))
        var, mean = torch.var_mean(exact, dim=(1, 3, 4), correction=0, keepdim=True)
        scale = self.weight.view(1, 1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        shift = self.bias.view(1, 1, -1, 1, 1) - mean * scale
        if self.track_running_stats:
            self._update_running_stats(
                mean.view(self.groups, -1), var.view(self.groups, -1), grouped[0].numel() // x.shape[1]
            )
        # y = x * scale + shift: one fused kernel, in the input's dtype (fp16/bf16 under autocast)
        return torch.addcmul(shift.to(x.dtype), grouped, scale.to(x.dtype)).flatten(0, 1)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """V updates r <- (1-m) r + m s_i, i = 1..V, in one: r <- (1-m)^V r + sum_i m (1-m)^(V-i) s_i.
        The variance enters unbiased (x count/(count-1)), as BatchNorm2d's."""
        m, v = self.momentum, self.groups
        weights = m * (1 - m) ** torch.arange(v - 1, -1, -1, device=mean.device, dtype=torch.float64)
        weights = weights.to(mean.dtype).unsqueeze(1)
        unbiased = var * (count / max(count - 1, 1))
        self.running_mean.mul_((1 - m) ** v).add_((weights * mean).sum(0))
        self.running_var.mul_((1 - m) ** v).add_((weights * unbiased).sum(0))
        self.num_batches_tracked.add_(v)


class SmallImageResNet(torch.nn.Module):
    """He et al.'s CIFAR ResNet (2016, Sec. 4.2) from torchvision's BasicBlock: a 3x3 stem of 16 channels, stages
    of 16, 32, 64 channels at full, 1/2 and 1/4 resolution, global average pooling, one linear layer. Shortcuts
    that change shape are 1x1 convolutions with BN (torchvision's, He's option B). The study's stand-in for
    ResNet-50: 0.08-0.27M parameters instead of 25.6M, so a 2-core CPU runs thousands of steps an hour."""

    def __init__(
        self, blocks_per_stage: int, num_classes: int, zero_init_residual: bool, norm_layer=torch.nn.BatchNorm2d
    ):
        super().__init__()
        nn = torch.nn
        layers = [nn.Conv2d(3, 16, 3, padding=1, bias=False), norm_layer(16), nn.ReLU(inplace=True)]
        channels = 16
        for stage, width in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                shortcut = None
                if stride != 1 or channels != width:
                    shortcut = nn.Sequential(
                        nn.Conv2d(channels, width, 1, stride=stride, bias=False), norm_layer(width)
                    )
                layers.append(BasicBlock(channels, width, stride, shortcut, norm_layer=norm_layer))
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
    total = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for position, tensor in enumerate(model.state_dict().values(), start=1):
        values = tensor.detach().double()
        total += position * values.sum() + values.square().sum()
    return total.item()  # host sync: one per epoch (two per tensor were 640 for ResNet-50)
