"""The lr schedule against the paper's numbers (Goyal et al. Sec. 2, 5.1; Table 2a). No torch, no Horovod."""

import math

import pytest

from hvd_imagenet.errors import UserError
from hvd_imagenet.schedule import LRPolicy, lr_at, peak_lr

pytestmark = pytest.mark.unit

PAPER = LRPolicy()  # base 0.1 at 256, linear, gradual warmup 5 epochs, x0.1 at 30/60/80
ITERS = 5005  # the iterations per epoch of the example (ImageNet-1k at kn = 256); any value works
KN_8K = 256 * 32


def test_peak_lr_scaling_rules_table_2a():
    assert peak_lr(PAPER, 256) == pytest.approx(0.1)
    assert peak_lr(PAPER, KN_8K) == pytest.approx(3.2)  # 0.1 x 32
    assert peak_lr(LRPolicy(lr_scaling="sqrt"), KN_8K) == pytest.approx(0.1 * math.sqrt(32))
    assert peak_lr(LRPolicy(lr_scaling="none"), KN_8K) == pytest.approx(0.1)


def test_gradual_warmup_from_eta_to_k_eta_then_steps():
    lr = [lr_at(PAPER, i, ITERS, KN_8K) for i in range(90 * ITERS)]
    warmup = 5 * ITERS
    assert lr[0] == pytest.approx(0.1)
    # A constant increment every iteration (Sec. 2.2), reaching 3.2 when warmup ends.
    increments = {round(b - a, 12) for a, b in zip(lr[:warmup], lr[1 : warmup + 1])}
    assert len(increments) == 1 and increments.pop() == pytest.approx((3.2 - 0.1) / warmup)
    assert lr[warmup] == pytest.approx(3.2)
    assert lr[30 * ITERS - 1] == pytest.approx(3.2)
    assert lr[30 * ITERS] == pytest.approx(0.32)
    assert lr[60 * ITERS] == pytest.approx(0.032)
    assert lr[80 * ITERS] == pytest.approx(0.0032)
    assert lr[-1] == pytest.approx(0.0032)


def test_constant_warmup_and_no_warmup():
    constant = LRPolicy(warmup="constant")
    assert lr_at(constant, 0, ITERS, KN_8K) == pytest.approx(0.1)
    assert lr_at(constant, 5 * ITERS - 1, ITERS, KN_8K) == pytest.approx(0.1)
    assert lr_at(constant, 5 * ITERS, ITERS, KN_8K) == pytest.approx(3.2)
    assert lr_at(LRPolicy(warmup="none"), 0, ITERS, KN_8K) == pytest.approx(3.2)


def test_baseline_minibatch_has_nothing_to_warm_up():
    # kn = 256: peak = base lr, so gradual warmup is a constant 0.1 until the first step.
    assert [lr_at(PAPER, i, 100, 256) for i in range(0, 3000, 50)] == pytest.approx([0.1] * 60)
    # kn below the reference: warmup starts at the (lower) peak rather than ramping down to it.
    assert lr_at(PAPER, 0, 100, 64) == pytest.approx(0.025)


@pytest.mark.parametrize(
    "bad",
    [
        dict(lr_scaling="cube"),
        dict(warmup="slow"),
        dict(base_lr=-0.1),
        dict(base_lr=0.0),
        dict(ref_batch=0),
        dict(warmup_epochs=-1),
        dict(lr_steps=(60, 30)),
        dict(lr_steps=(0, 30)),
        dict(lr_decay=0.0),
    ],
)
def test_bad_policy_is_a_user_error(bad):
    with pytest.raises(UserError):
        LRPolicy(**bad)
