"""`hvd-imagenet study`: the grid stands for the paper's rows and Fig. 1's sweep (pure), and the quick preset
runs end to end under real horovodrun on scikit-learn's digits, two runs side by side on a CPU each, writing the
table and the plots, and resumes without re-running."""

import dataclasses
import json
import math
import os
import re
import shutil
import statistics

import pytest
from conftest import run_cli
from PIL import Image

from hvd_imagenet.errors import UserError
from hvd_imagenet.metrics import read_metrics
from hvd_imagenet.schedule import LRPolicy, lr_at
from hvd_imagenet.study.grid import BASELINE, PRESETS, Scale, Setting, plan, resolve, train_args
from hvd_imagenet.study.outcomes import Outcome, max_effective_kn
from hvd_imagenet.study.report import curve_gap_after_warmup, write_report
from hvd_imagenet.study.run import cpu_sets


def flags(args: list[str]) -> dict:
    return dict(zip(args[::2], args[1::2]))


def peak_and_start(run: dict, ranks: int = 1) -> tuple[float, float]:
    """The lr of the run's first step and of the first step after warmup, by the flags the run gets."""
    policy = LRPolicy(
        base_lr=float(run["--base-lr"]),
        ref_batch=int(run["--ref-batch"]),
        lr_scaling=run["--lr-scaling"],
        warmup=run["--warmup"],
        warmup_epochs=float(run["--warmup-epochs"]),
        lr_steps=tuple(int(s) for s in run["--lr-steps"].split(",")),
    )
    kn = ranks * int(run["--virtual-workers-per-pass"]) * int(run["--batch-size"])
    steps = 100
    return lr_at(policy, 0, steps, kn), lr_at(policy, int(policy.warmup_epochs * steps) + 1, steps, kn)


@pytest.mark.unit
def test_table1_grid_is_the_papers_table1_at_small_scale():
    """Baseline kn = 2 workers x n=4 = 8 at eta=0.02; large kn = 32x by 64 virtual workers in one pass at 32 x
    eta, with no, constant or gradual warmup over 9 x 5/90 = 0.5 epochs; lr x0.1 at 9 x (30, 60, 80)/90; the
    memory loader."""
    settings, scale = resolve("table1", Scale())
    assert scale.epochs == 9
    runs = {s.key: flags(train_args(s, scale, seed=1, data="D", output="O")) for s in settings}
    assert list(runs) == ["small", "large-no-warmup", "large-constant-warmup", "large-gradual-warmup"]
    for key, run in runs.items():
        assert (run["--batch-size"], run["--ref-batch"], run["--seed"], run["--epochs"]) == ("4", "8", "1", "9")
        assert run["--virtual-workers-per-pass"] == ("2" if key == "small" else "64") and run["--loader"] == "memory"
        assert float(run["--warmup-epochs"]) == 0.5 and run["--lr-steps"] == "3,6,8"
    assert peak_and_start(runs["small"]) == (0.02, 0.02)
    assert peak_and_start(runs["large-no-warmup"]) == pytest.approx((0.64, 0.64))
    assert peak_and_start(runs["large-constant-warmup"]) == pytest.approx((0.02, 0.64))
    assert peak_and_start(runs["large-gradual-warmup"]) == pytest.approx((0.02, 0.64))  # 0.02 up to 0.64


@pytest.mark.unit
def test_workers_are_ranks_times_virtual_workers_in_one_pass():
    """k = ranks x V: 2 ranks run half the virtual workers each; k must split evenly over the ranks."""
    settings, scale = resolve("table1", Scale(ranks=2, small_workers=4))
    runs = {s.key: flags(train_args(s, scale, seed=0, data="D", output="O")) for s in settings}
    assert (runs["small"]["--virtual-workers-per-pass"], runs["large-no-warmup"]["--virtual-workers-per-pass"]) == (
        "2",
        "64",
    )
    assert peak_and_start(runs["large-gradual-warmup"], ranks=2) == pytest.approx((0.02, 0.64))
    with pytest.raises(Exception, match="must be a multiple of --ranks 2"):
        Scale(ranks=2, small_workers=3)


@pytest.mark.unit
def test_table2a_grid_scales_the_lr_three_ways():
    settings, scale = resolve("table2a", Scale(eta=0.1, epochs=90))
    runs = {s.key: flags(train_args(s, scale, seed=0, data="D", output="O")) for s in settings}
    peaks = {key: peak_and_start(run)[1] for key, run in runs.items()}
    assert peaks == pytest.approx(
        {
            "small": 0.1,
            "small-eta-x0.5": 0.05,
            "small-eta-x2": 0.2,  # the paper's
            "large-linear": 3.2,
            "large-unscaled": 0.1,  # Table 2a at 256 and 8k
            "large-sqrt": 0.1 * math.sqrt(32),
        }
    )
    assert runs["large-sqrt"]["--lr-steps"] == "30,60,80" and float(runs["large-sqrt"]["--warmup-epochs"]) == 5


@pytest.mark.unit
def test_fig1_grid_doubles_kn_up_to_the_max_factor_with_linear_scaling_and_gradual_warmup():
    settings, scale = resolve("fig1", Scale(max_factor=128))
    runs = {s.key: flags(train_args(s, scale, seed=0, data="D", output="O")) for s in settings}
    assert list(runs) == ["small", "x2", "x4", "x8", "x16", "x32", "x64", "x128"]
    for factor, run in zip((1, 2, 4, 8, 16, 32, 64, 128), runs.values()):
        assert run["--virtual-workers-per-pass"] == str(2 * factor)
        assert run["--warmup"] == ("none" if factor == 1 else "gradual")
        assert peak_and_start(run) == pytest.approx((0.02, 0.02 * factor))
    assert [s.key for s in resolve("fig1", Scale(max_factor=100))[0]][-1] == "x64"


@pytest.mark.unit
def test_max_effective_minibatch_is_the_largest_kn_before_the_first_one_over_a_point():
    outcomes = [Outcome(BASELINE)] + [Outcome(Setting(f"x{f}", f)) for f in (2, 4, 8, 16)]
    for outcome, errors in zip(outcomes, ([10.0, 10.4], [10.5, 11.0], [10.9, 11.3], [12.0, 11.0], [11.0, 11.2])):
        outcome.errors = errors  # means 10.2, 10.75, 11.1, 11.5 (over 11.2), 11.1 (within again: not counted)
    assert max_effective_kn(outcomes, Scale()) == 32
    outcomes[1].errors = [12.0]
    assert max_effective_kn(outcomes, Scale()) == 8  # the baseline alone
    outcomes[0].errors = []
    assert max_effective_kn(outcomes, Scale()) is None


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


@pytest.mark.unit
def test_fig1_report_names_the_maximum_effective_minibatch_and_plots_error_vs_kn(tmp_path):
    """The report of a fig1 sweep (kn 8, 16, 32, 64; 2 seeds) from its runs' metrics.jsonl as `train` writes
    them: kn=32 is the last within 1 point of the baseline (kn=64 is 1.5 over), so it is the maximum effective
    minibatch in results.json and study.md, and val_error_vs_kn.png is written."""
    settings, scale = resolve("fig1", Scale(max_factor=8, epochs=2))
    errors = {1: 10.0, 2: 10.4, 4: 10.8, 8: 11.5}  # % by factor: within +1 up to x4
    runs = plan(settings, 2, tmp_path)
    for run in runs:
        run.directory.mkdir(parents=True)
        (run.directory / "config.json").write_text(json.dumps({"steps_per_epoch": 64 // run.setting.factor}))
        error = errors[run.setting.factor] + 0.1 * run.seed
        records = [
            {"epoch": e, "val_top1": 100 - error - 5 * (2 - e), "train_top1": 80.0 + e, "epoch_seconds": 1.0}
            for e in (1, 2)
        ]
        (run.directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = write_report(runs, settings, scale, "fig1", "hvd-imagenet study --preset fig1", tmp_path)
    assert [path.name for path in written] == [
        "study.md",
        "results.json",
        "training_error.png",
        "lr_schedule.png",
        "val_error_vs_kn.png",
    ]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["max_effective_kn"] == 32
    assert [row["kn"] for row in results["rows"]] == [8, 16, 32, 64]
    assert [round(row["val_error_mean"], 2) for row in results["rows"]] == [10.05, 10.45, 10.85, 11.55]
    assert [row["steps"] for row in results["rows"]] == [128, 64, 32, 16]
    assert "**Maximum effective minibatch: kn = 32**" in (tmp_path / "study.md").read_text()
    with Image.open(tmp_path / "val_error_vs_kn.png") as plot:
        assert plot.size[0] > 300


@pytest.mark.cli
def test_unknown_preset_is_refused():
    result = run_cli("study", "--data", "D", "--output", "O", "--preset", "table9")
    assert result.returncode == 2 and "invalid choice: 'table9'" in result.stderr


@pytest.mark.unit
def test_side_by_side_runs_share_this_process_cpus_and_no_more_runs_than_cpus():
    """--parallel N: N runs, each pinned to its own equal share of the CPUs this process may use (0: as many
    runs as the CPUs hold runs of --ranks ranks, at least one); more runs than CPUs is refused in one line."""
    cpus = sorted(os.sched_getaffinity(0))
    assert cpu_sets(1, 1) == [cpus]
    default = cpu_sets(0, 1)
    assert [len(share) for share in default] == [1] * len(cpus) and sorted(sum(default, [])) == cpus
    assert cpu_sets(0, 2 * len(cpus)) == [cpus]  # more ranks than CPUs: one run on all of them
    with pytest.raises(
        UserError,
        match=rf"--parallel {len(cpus) + 1} is more runs than this process's "
        rf"{len(cpus)} CPUs",
    ):
        cpu_sets(len(cpus) + 1, 1)


@pytest.mark.horovod
def test_quick_study_runs_writes_table_and_plots_and_resumes(digits, tmp_path):
    output = tmp_path / "study"
    command = ["study", "--data", digits, "--output", output, "--preset", "quick", "--seeds", "2", "--epochs", "1"]
    result = run_cli(*command, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # Every run is a real Horovod job with the grid's world size, virtual workers and lr, pinned to one of the
    # two CPUs (two runs side by side).
    cpus = set()
    for key, kn, virtual, lr in (("small", 8, 2, 0.02), ("large-gradual-warmup", 256, 64, 0.64)):
        for seed in (0, 1):
            run = output / "runs" / f"{key}-seed{seed}"
            config = json.loads((run / "config.json").read_text())
            assert (config["world_size"], config["global_batch"], config["virtual_workers_per_pass"]) == (
                1,
                kn,
                virtual,
            )
            assert config["peak_lr"] == pytest.approx(lr) and config["seed"] == seed and config["loader"] == "memory"
            launched = (run / "train.log").read_text().splitlines()[0].split()
            assert launched[1:3] == ["taskset", "--cpu-list"] and "horovodrun" in launched[4]
            cpus.add(launched[3])
    assert cpus == {"0", "1"}
    # A line as each run starts and ends, in that order: never more runs under way than the two CPUs hold.
    under_way = []
    for line in result.stdout.splitlines():
        if started := re.fullmatch(r"study: (\S+) \(.*\) started on CPU\(s\) [01]", line):
            under_way.append(started[1])
        elif ended := re.fullmatch(r"study: (\S+) \(.*\): val top-1 error [\d.]+% after epoch 1, \d+ s", line):
            under_way.remove(ended[1])
        assert len(under_way) <= 2, result.stdout
    assert under_way == [] and result.stdout.count(" started on CPU(s) ") == 4, result.stdout

    results = json.loads((output / "results.json").read_text())
    assert [row["key"] for row in results["rows"]] == ["small", "large-gradual-warmup"]
    for row in results["rows"]:
        runs = [output / "runs" / f"{row['key']}-seed{seed}" for seed in (0, 1)]
        metrics = [record for run in runs for record in read_metrics(run)]
        assert row["val_error"] == pytest.approx([100 - m["val_top1"] for m in metrics])  # 1 epoch: its own
        assert row["seeds"] == 2 and row["val_error_mean"] == pytest.approx(statistics.mean(row["val_error"]))
        assert row["val_error_std"] == pytest.approx(statistics.stdev(row["val_error"]))
        assert row["train_error_mean"] == pytest.approx(statistics.mean(100 - m["train_top1"] for m in metrics))
    small_row, large_row = results["rows"]
    assert (small_row["kn"], large_row["kn"]) == (8, 256) and small_row["train_curve_gap"] is None
    # warmup is 1 x 5/90 epochs: the one epoch is after it
    assert large_row["train_curve_gap"] == pytest.approx(
        abs(large_row["train_error_mean"] - small_row["train_error_mean"])
    )
    study = (output / "study.md").read_text()
    small, large = (mean_std(row["val_error"]) for row in results["rows"])
    assert "| kn=8, eta=0.02 | 8 | 1 x 2 | 0.02 |" in study and f"**{small}**" in study
    assert "| kn=256, eta=0.02x32, gradual warmup | 256 | 1 x 64 | 0.64 |" in study and f"**{large}**" in study
    for name in ("training_error.png", "lr_schedule.png"):
        with Image.open(output / name) as image:
            assert image.format == "PNG" and image.size[0] > 500
        assert f"]({name})" in study

    again = run_cli(*command, timeout=300)
    assert again.returncode == 0 and "4 of 4 runs finished earlier" in again.stdout, again.stdout + again.stderr
    assert json.loads((output / "results.json").read_text()) == results


@pytest.mark.horovod
def test_a_failed_run_stops_the_study_with_its_log_and_a_resume_hint(digits, tmp_path):
    """A run that fails (here: an undecodable training image, which `train` refuses at its start) ends the study
    with exit 2 and one message: the run, its exit status, and train's own error line from its train.log."""
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    broken = sorted((data / "train").rglob("*.JPEG"))[0]
    broken.write_bytes(b"not a JPEG")
    result = run_cli(
        "study",
        "--data",
        data,
        "--output",
        tmp_path / "study",
        "--preset",
        "quick",
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--parallel",
        "1",
        timeout=300,
    )
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    # horovodrun's status (1), then train's own line, which a tail of the log would miss under horovodrun's traceback
    said = re.search(
        r"study: run small-seed0 failed \(exit 1\) after \d+ s; \S+/small-seed0/train.log says:\n"
        r"(.*)\nGive the same command again to resume the study\n",
        result.stderr,
    )
    assert said and f"hvd-imagenet train: error: rank 0: cannot decode {broken}" in said[1], result.stderr
    assert "Traceback" not in result.stderr
    assert "large-gradual-warmup-seed0" not in result.stdout + result.stderr  # --parallel 1: never started


@pytest.mark.cli
def test_study_of_another_grid_in_the_same_directory_is_refused(digits, tmp_path):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.json").write_text(json.dumps({"preset": "table1", "scale": Scale(epochs=9).__dict__}))
    result = run_cli("study", "--data", digits, "--output", tmp_path / "study", "--preset", "quick")
    assert result.returncode == 2 and "holds a study with preset table1" in result.stderr


@pytest.mark.unit
def test_curve_gap_counts_the_epochs_after_warmup_only():
    """The training-curve closeness of Fig. 2-4: mean |row - baseline| of the mean curves after warmup."""
    baseline, row = Outcome(BASELINE), Outcome(Setting("large-gradual-warmup", 32, warmup="gradual"))
    baseline.train_curves = [[50, 20, 10, 5], [50, 22, 10, 5]]  # mean 50, 21, 10, 5
    row.train_curves = [[90, 30, 12, 5], [70, 30, 14, 5]]  # mean 80, 30, 13, 5
    assert curve_gap_after_warmup(row, baseline, warmup_epochs=1.5) == pytest.approx((9 + 3 + 0) / 3)
    assert curve_gap_after_warmup(row, baseline, warmup_epochs=0) == pytest.approx((30 + 9 + 3 + 0) / 4)
    assert curve_gap_after_warmup(baseline, baseline, warmup_epochs=0) is None


@pytest.mark.unit
def test_presets_put_the_baseline_first():
    """The small kn at eta, no warmup, SGD first; beyond's has a key of its own (its runs take 2 passes per step
    for the noise scale, so they are not the other presets' baseline runs)."""
    for preset in PRESETS:
        settings, _ = resolve(preset, Scale())
        first = settings[0]
        assert first.key == ("beyond-sgd-x1" if preset == "beyond" else BASELINE.key)
        assert dataclasses.replace(first, key=BASELINE.key) == BASELINE
        assert all(s.factor > 1 or s.eta_factor != 1 for s in settings[1:])
