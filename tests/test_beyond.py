"""Past the paper's 8k (issue 26): LARS against a float64 reference of its formula under 2 Horovod ranks, label
smoothing against torch's, the poly and cosine schedules and the MLPerf recipe, the gradient noise scale on a
problem whose answer is known in closed form, and a resumed LARS run equal to the uninterrupted one."""

import contextlib
import json
import math
import subprocess

import pytest
import torch
from conftest import BIN, TINY_TRAIN, assert_epoch_2_equal, cli_env, horovodrun, run_cli, run_horovod

from hvd_imagenet import comm
from hvd_imagenet.cli import parse
from hvd_imagenet.config import TrainConfig
from hvd_imagenet.flags import from_args, to_argv
from hvd_imagenet.losses import build_loss
from hvd_imagenet.metrics import read_metrics
from hvd_imagenet.model import build_model
from hvd_imagenet.noise_scale import estimate
from hvd_imagenet.schedule import LRPolicy, lr_at
from hvd_imagenet.step import TrainStep, evaluate

WORKER = __file__.replace("test_beyond.py", "optimizer_worker.py")


def reference_gradients(weights: dict, batches: list) -> tuple[dict, list[float]]:
    """The gradient averaged over the ranks' batches (each rank's BN over its own batch), in float64; and each
    rank's own squared gradient norm."""
    model = build_model("cifar_resnet8", 10, zero_init_residual=True).double()
    model.load_state_dict({k: v.double() for k, v in weights.items()}, strict=False)
    model.train()
    total, squared = {}, []
    for images, target in batches:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(images.double()), target).backward()
        squared.append(sum(p.grad.square().sum().item() for p in model.parameters()))
        for name, p in model.named_parameters():
            total[name] = total.get(name, 0) + p.grad / len(batches)
    return total, squared


@pytest.mark.horovod
def test_lars_step_under_two_ranks_equals_a_float64_reference(tmp_path):
    """Two steps of --optimizer lars (momentum, weight decay, a large eta so the ratio matters): every weight
    equals the formula's in float64, with BN gamma/beta and biases getting plain momentum SGD, and the
    zero-init residual branches (gradient 0) a ratio of 1. The noise probe saw rank 0's own gradient, before
    Horovod's allreduce, and the step's averaged one."""
    out = tmp_path / "lars.pt"
    eta, decay, momentum = 0.02, 5e-3, 0.9
    done = subprocess.run(
        [
            *horovodrun(2, "--gloo", BIN / "python", WORKER, out),
            "--optimizer",
            "lars",
            "--arch",
            "cifar_resnet8",
            "--batch-size",
            "4",
            "--lars-eta",
            str(eta),
            "--weight-decay",
            str(decay),
            "--no-nesterov",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    weights = {k: v.double() for k, v in saved["start"].items()}
    velocity = {k: torch.zeros_like(v) for k, v in weights.items()}
    ratios_of_one = 0
    for index, lr in enumerate(saved["lrs"]):
        grads, local = reference_gradients(weights, [rank_batches[index] for rank_batches in saved["batches"]])
        small, big, probes = saved["sums"][index][4:7].tolist()
        assert probes == 1 and small == pytest.approx(local[0], rel=1e-4)  # rank 0's own, not the average
        assert big == pytest.approx(sum(g.square().sum().item() for g in grads.values()), rel=1e-4)
        for name, w in weights.items():
            g = grads[name]
            if w.ndim <= 1:  # BN gamma/beta, biases: the skip list
                velocity[name] = momentum * velocity[name] + lr * g
            else:
                w_norm, g_norm = w.norm(), g.norm()
                ratio = eta * w_norm / (g_norm + decay * w_norm) if w_norm > 0 and g_norm > 0 else 1.0
                ratios_of_one += g_norm == 0
                velocity[name] = momentum * velocity[name] + lr * ratio * (g + decay * w)
            weights[name] = w - velocity[name]
    assert ratios_of_one > 0  # the zero-init residual convolutions: no gradient in the first step
    for name, w in weights.items():
        torch.testing.assert_close(saved["after"][name].double(), w, rtol=1e-4, atol=1e-6, msg=name)
    moved = [name for name in weights if not torch.equal(saved["after"][name], saved["start"][name])]
    assert len(moved) == len(weights)  # every tensor took a step (weight decay moves even the zero-gradient ones)


NO_SCALING = torch.amp.GradScaler("cpu", enabled=False)


class Alone:
    """No Horovod, one process: nothing to synchronize."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def synchronize(self):
        pass

    def skip_synchronize(self):
        return contextlib.nullcontext()


@pytest.mark.horovod
def test_label_smoothing_is_torch_cross_entropy_and_validation_stays_plain():
    """--loss cross-entropy (losses.py's registry) with --label-smoothing 0.1."""
    torch.manual_seed(0)
    model = build_model("cifar_resnet8", 10, zero_init_residual=False)
    images, target = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    step = TrainStep(
        model,
        Alone(torch.optim.SGD(model.parameters(), lr=0.0)),
        NO_SCALING,
        contextlib.nullcontext(),
        micro_batches=1,
        criterion=build_loss(TrainConfig(data="unused", output="unused", loss="cross-entropy", label_smoothing=0.1)),
    )
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(images), target, label_smoothing=0.1)
    result = step(iter([(images, target)]), lr=0.0)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert result.loss.item() != pytest.approx(torch.nn.functional.cross_entropy(model(images), target).item())
    comm.init()  # Horovod at size 1, in this process: evaluate() reduces its sums over the ranks
    val = evaluate(model, [(images, target)], torch.device("cpu"), contextlib.nullcontext(), lambda: None)
    model.eval()
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(model(images), target).item()
    assert val["loss"] == pytest.approx(plain, rel=1e-6)


@pytest.mark.unit
def test_poly_and_cosine_run_from_the_peak_to_the_end_lr():
    iters, epochs, kn = 10, 20, 1024
    for schedule in ("poly", "cosine"):
        for warmup, start in (("linear", 0.0), ("gradual", 0.1)):
            policy = LRPolicy(lr_schedule=schedule, warmup=warmup, warmup_epochs=2, end_lr=1e-4)
            lrs = [lr_at(policy, i, iters, kn, epochs) for i in range(epochs * iters)]
            assert lrs[0] == pytest.approx(start) and lrs[20] == pytest.approx(0.4)  # peak: 0.1 x 1024 / 256
            assert lrs[-1] == pytest.approx(1e-4)
            assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))  # decays monotonically after warmup
            middle = 20 + (epochs * iters - 1 - 20) / 2
            shape = 0.25 if schedule == "poly" else 0.5  # (1/2)^2 and (1 + cos(pi/2)) / 2
            assert lr_at(policy, middle, iters, kn, epochs) == pytest.approx(1e-4 + (0.4 - 1e-4) * shape)
    with pytest.raises(ValueError, match="needs the run's epochs"):
        lr_at(LRPolicy(lr_schedule="poly"), 60, iters, kn)  # after the 5 warmup epochs


@pytest.mark.cli
def test_schedule_with_the_mlperf_recipe():
    """`schedule --recipe mlperf-v4` at NVIDIA's 8 x 8 x 50: linear warmup from 0 over 2 epochs to 11.0, poly
    power 2 to 1e-4 at the last of 37 epochs."""
    done = run_cli("schedule", "--recipe", "mlperf-v4", "--world-size", "64", "--iters-per-epoch", "400")
    assert done.returncode == 0, done.stderr
    rows = [line.split(",") for line in done.stdout.splitlines()[1:]]
    lr = {int(i): float(value) for i, _, value in rows}
    assert len(lr) == 37 * 400 and lr[0] == 0.0 and lr[400] == pytest.approx(5.5)
    assert lr[800] == pytest.approx(11.0)  # the warmup's end: the peak
    mid = 800 + (37 * 400 - 1 - 800) // 2
    assert lr[mid] == pytest.approx(1e-4 + (11.0 - 1e-4) * (1 - (mid - 800) / (37 * 400 - 1 - 800)) ** 2)
    assert lr[37 * 400 - 1] == pytest.approx(1e-4)


@pytest.mark.cli
def test_a_recipe_fills_defaults_explicit_flags_win_and_argv_rebuilds_it():
    args = parse(
        ["train", "--recipe", "mlperf-v4", "--data", "d", "--output", "o", "--label-smoothing", "0", "--epochs", "5"]
    )
    config = from_args(TrainConfig, args)
    assert (config.optimizer, config.batch_size, config.lr.base_lr, config.lr.ref_batch) == ("lars", 50, 11.0, 3200)
    assert (config.lr.warmup, config.lr.lr_schedule, config.eval_every, config.nesterov) == ("linear", "poly", 4, False)
    assert config.label_smoothing == 0.0 and config.epochs == 5  # given explicitly: they win
    argv = to_argv(config)
    assert "--label-smoothing" in argv and "--optimizer" not in argv  # differs from the recipe / is the recipe's
    assert from_args(TrainConfig, parse(["train", *argv])) == config
    assert "mlperf-v4" in run_cli("train", "--help").stdout


@pytest.mark.unit
def test_the_noise_scale_of_least_squares_matches_its_closed_form():
    """Least squares with x ~ N(0, I_d), y = x.w* + N(0, s^2), at a fixed w (lr 0): per-example gradients have
    mean G = u = w - w* and covariance (|u|^2 + s^2) I + u u^T, so B_simple = tr(Sigma)/|G|^2
    = (d (|u|^2 + s^2) + |u|^2) / |u|^2. The step unit with 2 passes of 32 (B_small 32, B_big 64), its probe
    and `estimate` find it within 10 %."""
    d, s = 8, 1.0
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(d, 1, bias=False)
    truth = torch.randn(d, generator=generator)
    u = torch.randn(d, generator=generator)
    u = u / u.norm()
    with torch.no_grad():
        model.weight.copy_((truth + u)[None])
    step = TrainStep(
        model,
        Alone(torch.optim.SGD(model.parameters(), lr=0.0)),
        NO_SCALING,
        contextlib.nullcontext(),
        micro_batches=2,
        noise_probe=True,
    )
    step.criterion = lambda output, y: 0.5 * (output[:, 0] - y).square().mean()  # least squares for this test

    def batches():
        while True:
            x = torch.randn(32, d, generator=generator)
            yield x, x @ truth + s * torch.randn(32, generator=generator)

    stream = batches()
    sums = sum(step(stream, lr=0.0).sums for _ in range(3000))
    expected = (d * (1 + s**2) + 1) / 1
    found = estimate(tuple(sums[4:7].tolist()), 32, 64)
    assert found["noise_scale"] == pytest.approx(expected, rel=0.10)
    assert found["grad_sq"] == pytest.approx(1.0, rel=0.10)


@pytest.mark.horovod
def test_a_resumed_lars_run_equals_the_uninterrupted_one(tiny_data, tmp_path):
    """--optimizer lars --label-smoothing 0.1 --lr-schedule poly under 2 ranks: stopped after epoch 1 and resumed,
    epoch 2 equals the uninterrupted run's bit for bit (LARS's momentum in the checkpoint). The noise scale is
    in metrics.jsonl: 2 ranks give two batch sizes."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    train = [
        "--data",
        tiny_data,
        "--loader",
        "memory",
        *TINY_TRAIN,
        "--optimizer",
        "lars",
        "--label-smoothing",
        "0.1",
        "--lr-schedule",
        "poly",
        "--warmup",
        "linear",
    ]
    result = run_horovod("--output", whole, "--epochs", "2", *train)
    assert "noise scale from passes of 4 and steps of 8 images" in result.stdout
    run_horovod("--output", split, "--epochs", "1", *train)
    assert "continuing from" in run_horovod("--output", split, "--epochs", "2", "--resume", *train).stdout
    assert_epoch_2_equal(whole, split)
    records = read_metrics(whole)
    assert records[-1]["lr"] == pytest.approx(1e-4)  # poly ends at --end-lr
    assert all(r["grad_trace_cov"] > 0 for r in records)  # the ranks' own gradients are noisier than their mean
    assert [r["noise_scale"] for r in records] == [r["noise_scale"] for r in read_metrics(split)]


@pytest.mark.unit
def test_the_beyond_grid():
    """--preset beyond: the baseline, 3 recipes x kn 256..2,048, each recipe's lr x0.5 and x2 at 2,048; every run
    in 2 passes (the noise scale's two batch sizes) with its recipe's flags, which train accepts."""
    from hvd_imagenet.study.grid import RECIPES, Scale, peak, resolve, train_args, train_config

    settings, scale = resolve("beyond", Scale())
    assert len(settings) == 1 + 3 * 4 + 3 * 2 and settings[0].factor == 1
    assert sorted({s.factor for s in settings[1:]}) == [32, 64, 128, 256]
    for setting in settings:
        config = train_config(setting, scale, 0, "data", "out")
        recipe = RECIPES[setting.recipe]
        assert config.batches_per_allreduce == 2 and config.pass_batch * 2 == 8 * setting.factor
        assert (config.optimizer, config.label_smoothing, config.lr.lr_schedule) == (
            recipe.optimizer,
            recipe.label_smoothing,
            recipe.lr_schedule,
        )
        args = train_args(setting, scale, 0, "data", "out")
        assert from_args(TrainConfig, parse(["train", *args])) == config
    lars = {s.key: peak(s, scale) for s in settings if s.recipe == "lars"}
    # MLPerf's 11.0 at 3,200 -> x0.2 at kn 100, then the square root of kn: 2.2 x sqrt(256 / 100) at kn 256
    assert lars["beyond-lars-x32"] == pytest.approx(2.2 * math.sqrt(2.56))
    assert lars["beyond-lars-x256-lr2"] == pytest.approx(2 * lars["beyond-lars-x256"])


@pytest.mark.parametrize(
    "flags",
    [
        (
            "--compression",
            "powersgd",
            "--powersgd-start-step",
            "0",
            "--batches-per-allreduce",
            "2",
            "--channels-last",
            "--max-grad-norm",
            "1.0",
        ),
        ("--compression", "fp16", "--virtual-workers-per-pass", "2", "--precision", "amp-fp16"),
    ],
    ids=["powersgd-passes-nhwc-clip", "fp16-one-pass-amp"],
)
@pytest.mark.horovod
def test_lars_composes_with_compression_passes_and_precision(tiny_data, tmp_path, flags):
    """LARS under 2 ranks with the other step options: it trains (finite loss), and every rank holds the same
    weights after each epoch. PowerSGD's low-rank average leaves no noise scale; the fp16 run has one."""
    output = tmp_path / "run"
    run_horovod(
        "--data",
        tiny_data,
        "--output",
        output,
        "--loader",
        "memory",
        "--epochs",
        "2",
        *TINY_TRAIN,
        "--optimizer",
        "lars",
        "--label-smoothing",
        "0.1",
        *flags,
    )
    records = read_metrics(output)
    assert len(records) == 2 and all(math.isfinite(r["train_loss"]) for r in records)
    assert all(len(set(r["weights_digests"])) == 1 for r in records)
    measured = [r["noise_scale"] is not None or r["grad_sq"] is not None for r in records]
    assert measured == ([False, False] if "powersgd" in flags else [True, True])


@pytest.mark.unit
def test_the_beyond_report_names_each_recipes_limit_and_the_baselines_noise_scale(tmp_path):
    """From runs' metrics.jsonl as `train` writes them (2 seeds, 2 epochs): SGD within 1 point of the baseline
    up to kn 512 only, LARS up to 2,048, SGD + poly nowhere; the baseline's noise scale per epoch, mean over
    seeds, beside fig1's limit read from docs/study/fig1 beside the study."""
    from PIL import Image

    from hvd_imagenet.study.grid import Scale, plan, resolve
    from hvd_imagenet.study.report import write_report

    settings, scale = resolve("beyond", Scale(epochs=2))
    over = {
        "sgd": {32: 0.5, 64: 0.9, 128: 3.0, 256: 9.0},
        "lars": {32: 0.2, 64: 0.4, 128: 0.6, 256: 0.9},
        "sgd-poly": {32: 1.5, 64: 2.0, 128: 4.0, 256: 8.0},
    }
    study = tmp_path / "beyond"
    (tmp_path / "fig1").mkdir()
    (tmp_path / "fig1" / "results.json").write_text(json.dumps({"max_effective_kn": 256}))
    runs = plan(settings, 2, study)
    for run in runs:
        s = run.setting
        run.directory.mkdir(parents=True)
        (run.directory / "config.json").write_text(json.dumps({"steps_per_epoch": 10}))
        error = 8.0 + (over[s.recipe][s.factor] if s.factor > 1 else 0) + (0.3 if s.eta_factor != 1 else 0)
        noise = [100.0 + 50 * run.seed, 300.0 + 50 * run.seed]
        records = [
            {"epoch": e, "val_top1": 100 - error, "train_top1": 90.0, "epoch_seconds": 1.0, "noise_scale": noise[e - 1]}
            for e in (1, 2)
        ]
        (run.directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = write_report(runs, settings, scale, "beyond", "hvd-imagenet study --preset beyond", study)
    assert written[-1].name == "beyond.png"
    results = json.loads((study / "results.json").read_text())
    assert results["max_effective_kn"] == {"sgd": 512, "lars": 2048, "sgd-poly": None}
    assert results["baseline_noise_scale_per_epoch"] == [125.0, 325.0] and results["fig1_max_effective_kn"] == 256
    text = (study / "study.md").read_text()
    assert "| lars | LARS, label smoothing 0.1" in text and "125, 325 images (from B_small = 4" in text
    with Image.open(study / "beyond.png") as plot:
        assert plot.size[0] > 300
