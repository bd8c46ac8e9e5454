"""The pieces every command shares: flags built from dataclasses and turned back into argv, bounds checked in
one place, the --compression registry, the step unit, and the plain status lines under a launcher."""

import argparse
import contextlib
import dataclasses
import io

import pytest
import torch
from conftest import checkpoint_state

from hvd_imagenet import flags
from hvd_imagenet.bench.launch import LaunchOptions
from hvd_imagenet.bench.scaling import Cluster, EpochBoundary, Gradients, ScalingOptions, predict
from hvd_imagenet.bench.train import TrainBenchOptions
from hvd_imagenet.compression import COMPRESSIONS
from hvd_imagenet.config import TrainConfig
from hvd_imagenet.errors import UserError
from hvd_imagenet.progress import EpochProgress
from hvd_imagenet.schedule import LRPolicy
from hvd_imagenet.step import PHASES, PhaseClock, TrainStep
from hvd_imagenet.study.grid import Scale
from hvd_imagenet.study.run import StudyOptions

pytestmark = pytest.mark.unit


def parse_back(cls, argv):
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, cls)
    return flags.from_args(cls, parser.parse_args(argv))


@pytest.mark.parametrize(
    "instance",
    [
        TrainConfig(
            output="o",
            loader="synthetic",
            epochs=7,
            nesterov=False,
            min_crop_area=0.3,
            compression="fp16",
            eval_every=4,
            checkpoint_every=2,
            lr=LRPolicy(base_lr=0.0125, lr_steps=(2, 5), warmup="constant", warmup_epochs=1.5),
        ),
        TrainBenchOptions(
            np=(2, 4),
            backend=("ddp",),
            compression=("none", "powersgd"),
            layout=("nhwc",),
            precision=("amp-bf16", "fp32"),
            cycle_time_ms=2.5,
            launch=LaunchOptions(controller="mpi"),
        ),
        StudyOptions(data="d", output="o", preset="quick", seeds=2, scale=Scale(eta=0.05, large_factor=8)),
        ScalingOptions(
            cluster=Cluster(overlap=0.5, nics_per_node=4),
            nodes=(1, 32),
            compression=("fp16",),
            epoch=EpochBoundary(eval_every=2, host_copy_gb_s=12.5),
        ),
    ],
    ids=["train", "bench-train", "study", "scaling-model"],
)
def test_flags_round_trip_through_argv(instance):
    """to_argv gives the flags that rebuild the very instance (launchers re-invoke the CLI with them)."""
    argv = flags.to_argv(instance)
    assert parse_back(type(instance), argv) == instance
    assert "--nesterov" not in argv  # defaults are left out: readable command lines
    chosen = flags.to_argv(instance, names=("seeds", "epochs", "np"))
    assert set(chosen[::2]) <= {"--seeds", "--epochs", "--np"} and chosen


def test_a_tuple_flag_takes_commas_or_repeats():
    options = parse_back(TrainBenchOptions, ["--compression", "none", "--compression", "fp16,powersgd"])
    assert options.compression == ("none", "fp16", "powersgd")
    assert parse_back(TrainBenchOptions, []).compression == ("none",)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Scale(ranks=0), "--ranks must be >= 1, not 0"),
        (lambda: Cluster(overlap=1.5), "--overlap must be <= 1, not 1.5"),
        (lambda: LRPolicy(lr_decay=0.0), "--lr-decay must be in (0, 1], not 0.0"),
        (lambda: LRPolicy(base_lr=0.0), "--base-lr must be > 0, not 0.0"),
        (lambda: TrainBenchOptions(np=(2, 0)), "--np must be >= 1, not 2,0"),
        (lambda: TrainBenchOptions(backend=("horovod", "mpi")), "--backend must be one of horovod, ddp"),
        (lambda: LaunchOptions(link="5gbit"), "--link must be one of loopback, 10gbit, 1gbit"),
    ],
)
def test_bounds_are_checked_in_one_place(build, message):
    with pytest.raises(UserError) as error:
        build()
    assert message in str(error.value)


def test_every_compressor_is_one_complete_registry_entry():
    """--compression's choices are the registry's names; each entry resolves to a Horovod object, a DDP hook
    where it names one, and a wire model the scaling model can use."""
    from hvd_imagenet import comm

    assert set(COMPRESSIONS) == set(comm.COMPRESSORS) == {"none", "fp16", "bf16", "powersgd"}
    choices = next(f for f in dataclasses.fields(TrainConfig) if f.name == "compression").metadata["choices"]
    assert choices == tuple(COMPRESSIONS)
    grads = Gradients(elements=25_000_000, matrices=50, powersgd_elements=200_000)
    for name, entry in COMPRESSIONS.items():
        assert entry.horovod_object() is comm.COMPRESSORS[name]
        row = predict(Cluster(), grads, nodes=2, compression=name, hierarchical=True)
        assert row["step_ms"] > Cluster().step_time_ms
    assert predict(Cluster(), grads, 2, "bf16", True) == {
        **predict(Cluster(), grads, 2, "fp16", True),
        "compression": "bf16",
    }


class LocalOptimizer(torch.optim.SGD):
    """One process, no Horovod: nothing to synchronize."""

    def synchronize(self):
        pass

    @contextlib.contextmanager
    def skip_synchronize(self):
        yield


def test_the_step_skips_nonfinite_gradients_and_restores_bn():
    """A NaN in the batch: the step is not applied, the weights and the BN running statistics are as before;
    a finite batch is applied. The phase clock sees every phase of both."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(5)
    )
    model(torch.zeros(2, 3, 8, 8))
    optimizer = LocalOptimizer(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    clock = PhaseClock(torch.device("cpu"))
    step = TrainStep(
        model, optimizer, scaler, contextlib.nullcontext(), micro_batches=2, restore_bn=True, on_phase=clock
    )
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = step(iter([(bad[:2], labels[:2]), (bad[2:], labels[2:])]), lr=0.1)
    assert not result.applied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    clock.start()
    result = step(iter([(images[:2], labels[:2]), (images[2:], labels[2:])]), lr=0.1)
    assert result.applied and result.sums[3].item() == 4  # 4 images counted over the two micro-batches
    assert not torch.equal(before["0.weight"], model.state_dict()["0.weight"])
    assert set(clock.seconds) == set(PHASES) and all(s > 0 for s in clock.seconds.values())


def test_an_amp_fp16_overflow_skips_the_step_restores_bn_and_halves_the_scale():
    """amp-fp16: a NaN in a batch makes unscale_ flag the gradients; the step says so (from the flags, its one
    host sync), GradScaler skips it and halves the scale, and the BN statistics are as before."""
    from hvd_imagenet.precision import autocast

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(5)
    )
    model(torch.zeros(2, 3, 8, 8))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    step = TrainStep(
        model,
        LocalOptimizer(model.parameters(), lr=0.1),
        scaler,
        autocast("amp-fp16", torch.device("cpu")),
        micro_batches=1,
        restore_bn=True,
    )
    images, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not step(iter([(bad, labels)]), lr=0.1).applied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scaler.get_scale() == 512.0
    assert step(iter([(images, labels)]), lr=0.1).applied
    assert not torch.equal(before["0.weight"], model.state_dict()["0.weight"])


def test_status_lines_under_a_launcher():
    """Not a terminal: plain lines (no carriage returns), one at the epoch's start and one per interval."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        progress = EpochProgress(
            True, epoch=1, epochs=4, first_step=0, steps=3, global_batch=64, every=0.0, terminal=False
        )
        for step in range(3):
            progress.update(step, torch.tensor(2.5), lr=0.1)
        progress.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "epoch 2/4: steps 1-3 of 3, kn=64"
    assert len(lines) == 4 and lines[-1].startswith("epoch 2/4 step 3/3 | loss 2.500 | lr 0.1 | ")
    assert "epoch ETA 0:00:00 | run ETA" in lines[-1]


def test_rank_files_go_with_their_checkpoint(tmp_path):
    """Per-rank state (PowerSGD's error memory) sits beside its checkpoint and is deleted with it when
    --keep-checkpoints drops that checkpoint; load_rank_file names a missing one."""
    from hvd_imagenet import checkpoint

    state = checkpoint_state()
    for epoch in (1, 2):
        path = checkpoint.path_for(tmp_path, epoch, 0)
        for rank in (0, 1):
            checkpoint.write_atomic(checkpoint.rank_file(path, rank), {"errors": {0: torch.full((2,), rank)}})
        checkpoint.save(tmp_path, {**state, "epoch": epoch}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch-0002.pt",
        "epoch-0002.rank00000.pt",
        "epoch-0002.rank00001.pt",
    ]
    assert torch.equal(checkpoint.load_rank_file(path, 1)["errors"][0], torch.full((2,), 1))
    with pytest.raises(UserError, match="epoch-0002.rank00002.pt is missing"):
        checkpoint.load_rank_file(path, 2)
