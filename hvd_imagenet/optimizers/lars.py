"""--optimizer lars: Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017, arXiv 1708.03888) as
MLPerf's ResNet-50 reference applies it (mlcommons/training image_classification/tensorflow2/lars_optimizer.py):

    adapted layers (weights)      ratio = eta ||w|| / (||g|| + lambda ||w|| + eps), 1 if either norm is 0
                                  v <- m v + lr ratio (g + lambda w)     momentum on the adapted step
                                  w <- w - v            (Nesterov: w - (m v + lr ratio (g + lambda w)))
    BN gamma/beta and biases      v <- m v + lr g; w <- w - v: neither trust ratio nor weight decay
                                  (the reference's skip list `batch_normalization`, `bias`)

g is the gradient averaged over all ranks (Horovod's allreduce ran before step(), and AMP's unscale), so every
rank computes the same update. Norms come from fused foreach kernels, the ratios stay on the device: no host
synchronization. The momentum buffers are the optimizer's state_dict, so a checkpoint resumes LARS exactly.
"""

from __future__ import annotations

import torch

from ..model import parameter_groups


class LARS(torch.optim.Optimizer):
    """Each param group has lr, momentum, nesterov, weight_decay, eta, epsilon and `adapt` (whether its
    tensors get the trust ratio and weight decay)."""

    def __init__(
        self,
        param_groups,
        lr: float = 0.0,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        epsilon: float = 0.0,
        adapt: bool = True,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            eta=eta,
            epsilon=epsilon,
            adapt=adapt,
        )
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        lr, momentum = group["lr"], group["momentum"]
        if group["adapt"]:
            decay = group["weight_decay"]
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            ratio = torch.where(
                (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / (g_norm + decay * w_norm + group["epsilon"]), 1.0
            )
            steps = torch._foreach_add(grads, params, alpha=decay)  # g + lambda w: new tensors, .grad untouched
            torch._foreach_mul_(steps, (lr * ratio).unbind())  # one 0-d device scalar per tensor: no host copy
        else:
            steps = torch._foreach_mul(grads, lr)
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, steps)
        if group["nesterov"]:
            torch._foreach_add_(steps, buffers, alpha=momentum)
        else:
            steps = buffers
        torch._foreach_sub_(params, steps)


def build(config, model: torch.nn.Module) -> LARS:
    """model.parameter_groups' two groups: the weights adapted, BN gamma/beta and biases plain momentum SGD
    (with --bn-weight-decay every tensor is in the first group, so adapted)."""
    weights, bn_and_biases = parameter_groups(model, config.weight_decay, config.bn_weight_decay)
    groups = [{**weights, "adapt": True}, {**bn_and_biases, "adapt": False}]
    return LARS(
        groups, momentum=config.momentum, nesterov=config.nesterov, eta=config.lars_eta, epsilon=config.lars_epsilon
    )
