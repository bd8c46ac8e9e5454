"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, arXiv 1812.06162): about the
batch size past which a larger batch stops buying fewer steps (their "critical batch size"), in images.

App. A: gradients of two batch sizes B_small < B_big give unbiased estimates

    |G|^2     = (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)
    tr(Sigma) = (|g_small|^2 - |g_big|^2) / (1 / B_small - 1 / B_big)

averaged over steps, then divided. Here g_small is each rank's gradient of its first pass (V x n images,
`pass_batch`), taken by a hook as it is accumulated: before Horovod's allreduce sends it (with one pass per step)
or before the next pass adds to it (--batches-per-allreduce >= 2, the way a single rank gets two sizes). g_big is
the step's gradient averaged over all ranks and passes (kn images). Both squared norms go into the epoch's metric
sums (metrics.EpochSums), which are reduced across ranks once per epoch anyway: no collective and no host
synchronization in the step. The per-epoch means of the two stand for the paper's moving averages.
"""

from __future__ import annotations

import torch


class NoiseProbe:
    """Hooks that, while armed, collect the L2 norm of each parameter's gradient when it is accumulated.
    A tensor's post-accumulate-grad hook runs inside autograd's accumulation node, before that node's own
    hooks, which is where Horovod starts a gradient's allreduce: so the norms are this rank's own gradient."""

    def __init__(self, model: torch.nn.Module):
        self.armed, self.norms = False, []
        self.handles = [
            p.register_post_accumulate_grad_hook(self._collect) for p in model.parameters() if p.requires_grad
        ]

    def _collect(self, param: torch.Tensor) -> None:
        if self.armed:
            self.norms.append(torch.linalg.vector_norm(param.grad))  # one device kernel, no sync

    def arm(self) -> None:
        self.armed, self.norms = True, []

    def disarm(self) -> None:
        self.armed = False

    def squared_norm(self) -> torch.Tensor:
        """|g|^2 of the gradient as it was accumulated while armed."""
        return torch.stack(self.norms).double().square().sum()


def estimate(sums: tuple[float, ...], b_small: int, b_big: int) -> dict:
    """B_simple in images, |G|^2 and tr(Sigma) from an epoch's sums of (|g_small|^2, |g_big|^2, probes);
    None where there was no probe, or where |G|^2 came out <= 0 (noise swamps the signal at these sizes)."""
    small_sum, big_sum, probes = sums
    if not probes or b_big <= b_small:
        return {"noise_scale": None, "grad_sq": None, "grad_trace_cov": None}
    small, big = small_sum / probes, big_sum / probes
    grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
    trace = (small - big) / (1 / b_small - 1 / b_big)
    return {"noise_scale": trace / grad_sq if grad_sq > 0 else None, "grad_sq": grad_sq, "grad_trace_cov": trace}
