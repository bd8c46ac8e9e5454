"""Faults, each tried for real, each ending as docs/reliability.md says: a rank killed with -9 under both
controllers, a kill during a checkpoint write, corrupt and foreign checkpoints, a resume on another world
size, diverging training, and an elastic job that loses a worker and one that gains one.
(The SIGUSR1 stop-and-resume is in test_slurm.py; bad flags and bad data in test_cli.py.)"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch
from conftest import BIN, TINY_TRAIN, checkpoint_state, cli_env, run_cli, run_horovod, shared_memory_files, wait_for

from hvd_imagenet import checkpoint
from hvd_imagenet.data.make_dataset import make_dataset
from hvd_imagenet.data.shards import train_shard
from hvd_imagenet.errors import UserError
from hvd_imagenet.metrics import read_metrics


def processes_with(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries `marker` (a job's ranks and everything they started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            pass
    return found


def trainer_of_rank(marker: str, rank: int) -> int | None:
    """The PID of the `hvd-imagenet train` process of one rank (not its loader workers or launcher)."""
    for pid in processes_with(marker):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        is_trainer = any(part.endswith(b"hvd-imagenet") for part in command) and b"train" in command
        ranks = {f"HOROVOD_RANK={rank}".encode(), f"OMPI_COMM_WORLD_RANK={rank}".encode()}
        if is_trainer and ranks & set(environ):
            return pid
    return None


class Job:
    """`horovodrun <launch> hvd-imagenet train ...` in the background, its output in a file, every
    process it starts marked in its environment (so that the test finds each rank and what is left over)."""

    def __init__(self, tmp_path: Path, launch: list[str], data: Path, *train_args: str):
        self.marker = f"HVD_TEST_JOB={uuid.uuid4().hex}"
        self.log = tmp_path / "job.log"
        self.output = tmp_path / "run"
        command = [
            str(BIN / "horovodrun"),
            *launch,
            "hvd-imagenet",
            "train",
            "--data",
            str(data),
            "--output",
            str(self.output),
            "--loader",
            "torchvision",
            *train_args,
        ]
        env = {**cli_env(), self.marker.split("=")[0]: self.marker.split("=")[1]}
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for_output(self, text: str, timeout: float = 120) -> None:
        wait_for(lambda: text in self.text() or self.process.poll() is not None, timeout, repr(text))
        assert text in self.text(), self.text()[-3000:]

    def trainer(self, rank: int) -> int:
        return wait_for(lambda: trainer_of_rank(self.marker, rank), 10, f"rank {rank}'s process")

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)

    def wait_until_all_gone(self) -> None:
        wait_for(lambda: not processes_with(self.marker), 10, "every process of the job to exit")


def two_ranks(controller: str) -> list[str]:
    return ["-np", "2", "-H", "localhost:2", controller]


@pytest.mark.parametrize(
    ("controller", "loader"), [("--gloo", "torchvision"), ("--mpi", "torchvision"), ("--gloo", "memory")]
)
@pytest.mark.horovod
def test_kill_9_of_one_rank_ends_the_job_fast(tiny_data, tmp_path, controller, loader):
    """kill -9 of rank 1 mid-epoch (no chance to say anything): the job ends within 60 s, non-zero, the
    launcher names rank 1, and no process of the job is left behind (loader workers included). With
    --loader memory, nothing in /dev/shm either: its files were unlinked before training, once mapped."""
    before = shared_memory_files()
    job = Job(tmp_path, two_ranks(controller), tiny_data, "--epochs", "100", *TINY_TRAIN, "--loader", loader)
    job.wait_for_output("epoch 1/100")
    time.sleep(2)  # well into the epoch loop
    assert shared_memory_files() == before  # mapped by both ranks, already unlinked
    os.kill(job.trainer(1), signal.SIGKILL)
    killed = time.monotonic()
    returncode = job.wait(timeout=60)
    took = time.monotonic() - killed
    output = job.text()
    assert returncode != 0 and took < 60, (returncode, took, output[-3000:])
    if controller == "--gloo":  # horovodrun: "Process 1 exit with status code 137" ... "Process name: 1"
        assert "Process name: 1\nExit code: 137" in output, output[-3000:]
    else:  # mpirun: "mpirun noticed that process rank 1 with PID ... exited on signal 9 (Killed)."
        assert "process rank 1" in output and "signal 9" in output, output[-3000:]
    job.wait_until_all_gone()
    assert shared_memory_files() == before


# s: 3-5 times the start-up to the first step here (4-6 s), which the watchdog counts too, and below Gloo's own
# timeout (HOROVOD_GLOO_TIMEOUT_SECONDS, 30 s), which would otherwise end the --gloo job first
HANG_TIMEOUT = 20

WATCHED = """
import sys, time
from hvd_imagenet.watchdog import Watchdog
watchdog = Watchdog(1.0, "/ckpt", rank=lambda: 3).start()
for step in range(30):  # 3 s of steps, 0.1 s apart: progress, so nothing fires
    time.sleep(0.1)
    watchdog.step_done(epoch=1, step=step % 6, steps=6)
watchdog.checkpoint_saved("/ckpt/epoch-0002.pt", complete=False)  # rank 0 is writing it in the background
print("alive", flush=True)
watchdog.step_done(epoch=2, step=0, steps=6)  # says nothing of the write
if sys.argv[1] == "written":
    watchdog.checkpoint_saved("/ckpt/epoch-0002.pt", complete=True)  # rank 0's writer thread: on disk
watchdog.progress("evaluation")
time.sleep(10)  # silent: the watchdog ends the process after 1 s
"""


@pytest.mark.cli
@pytest.mark.parametrize("then", ["written", "still-writing"])
def test_the_watchdog_ends_a_silent_process_and_says_where(then):
    result = subprocess.run([sys.executable, "-c", WATCHED, then], capture_output=True, text=True, timeout=60)
    assert result.returncode == 4 and result.stdout == "alive\n", (result.returncode, result.stdout, result.stderr)
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"hvd-imagenet train: rank 3 (host {os.uname().nodename}, pid ")
    assert "(--hang-timeout 1) in evaluation (the last step completed: 1/6 of epoch 3)" in line, line
    if then == "written":  # the checkpoint counts as complete once its writer says so, not after a step
        assert line.endswith("--resume continues from /ckpt/epoch-0002.pt"), line
    else:
        assert line.endswith("the newest complete checkpoint in /ckpt (rank 0 was writing epoch-0002.pt)"), line


@pytest.mark.horovod
@pytest.mark.parametrize(("controller", "stopped"), [("--gloo", "rank"), ("--mpi", "rank"), ("--mpi", "input")])
def test_a_stopped_rank_ends_the_job_within_the_hang_timeout(tiny_data, tmp_path, controller, stopped):
    """kill -STOP of rank 1 mid-epoch (alive and silent, as a rank with a driver fault looks from outside):
    under MPI nothing else would ever end the job (Horovod's negotiation blocks in an MPI collective). Or
    of its training input alone (its train loader's worker: a rank stuck reading a hung file system, its
    Horovod thread alive). Rank 0's watchdog ends rank 0 with its one line, and the launcher ends the job, the
    stopped processes included; nothing is left behind.
    A stopped rank stalls the job where it was: 1 s into epoch 2 a tiny epoch (6 steps, 3 val batches) may be
    training or evaluating, or (a loaded machine: once in CI) past an epoch's checkpoint, where the ranks agree on
    signals, and rank 0's line names the phase it waits in. The input case stops the train loader's worker
    only (the older of the two: persistent workers, started at epoch 1's first step, the val loader's at its
    evaluation), so the stall is in training: the rank may still take the batches already prefetched and
    evaluate, then waits at the next training step. (Stopping the val worker too made that a race: once in CI
    the rank had its epoch's last batches prefetched and stalled in evaluation.)"""
    job = Job(
        tmp_path, two_ranks(controller), tiny_data, "--epochs", "100", "--hang-timeout", str(HANG_TIMEOUT), *TINY_TRAIN
    )
    job.wait_for_output("epoch 2/100")  # epoch 1's checkpoint is written
    time.sleep(1)
    rank_1 = job.trainer(1)
    if stopped == "rank":
        victim = rank_1
    else:
        # the loader workers are the forkserver's children (the rank's own are the server and resource tracker)
        workers = [p for p in psutil.Process(rank_1).children(recursive=True) if p.ppid() != rank_1]
        workers.sort(key=lambda worker: worker.create_time())
        assert len(workers) == 2, workers  # the train loader's worker, the val loader's (--workers 1)
        victim = workers[0].pid
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    returncode = job.wait(timeout=HANG_TIMEOUT + 60)
    took = time.monotonic() - stopped_at
    output = job.text()
    # the margin: the watchdog's check interval, then the launcher's teardown (horovodrun: SIGTERM, 5 s, SIGKILL)
    assert returncode != 0 and HANG_TIMEOUT - 3 < took < HANG_TIMEOUT + 30, (returncode, took, output[-3000:])
    lines = [line for line in output.splitlines() if "rank 0 (host" in line and "no progress for" in line]
    assert len(lines) == 1, output[-3000:]
    where = re.search(
        rf"\(--hang-timeout {HANG_TIMEOUT}\) in (training|evaluation|epoch end) "
        rf"\(the last step completed: (\d)/6 of epoch (\d+)\)",
        lines[0],
    )
    assert where, lines[0]
    phase, step, epoch = where.groups()
    assert int(epoch) >= 2 and (phase == "training" if stopped == "input" else step == "6" or phase == "training")
    assert "ending this rank (exit status 4)" in lines[0]
    named = Path(lines[0].split("--resume continues from ")[1])  # the newest checkpoint, complete
    assert named == checkpoint.list_checkpoints(job.output / "checkpoints")[-1]
    checkpoint.load(job.output / "checkpoints")
    if controller == "--gloo":
        assert "Process 0 exit with status code 4." in output, output[-3000:]
    else:  # mpirun: "... process rank 0 ... exited with non-zero status" / "Exit code: 4"
        assert "Exit code:    4" in output, output[-3000:]
    job.wait_until_all_gone()


@pytest.mark.horovod
def test_an_evaluation_longer_than_the_hang_timeout_does_not_stop_the_run(tmp_path_factory, tmp_path):
    """--hang-timeout T counts silence, not slowness: an evaluation longer than T (1,200 val images for
    ResNet-50 at 128 px: 17 s here against T = 10 s; at 64 px it was 9 s in one CI run, too short to test
    anything) makes progress with every batch. One rank: with two, the rank that finishes its shard
    first waits for the other in the final reduction, and that wait is silence (once 15 s of 34 s evaluations
    in a full test run here: docs/reliability.md)."""
    data = tmp_path_factory.mktemp("bigval") / "data"
    make_dataset(data, classes=4, train_per_class=12, val_per_class=300, seed=1, workers=2)
    timeout = 10  # s: twice the start-up here
    job = Job(
        tmp_path,
        ["-np", "1", "-H", "localhost:1", "--gloo"],
        data,
        "--epochs",
        "1",
        "--hang-timeout",
        str(timeout),
        *TINY_TRAIN,
        "--arch",
        "resnet50",
        "--image-size",
        "128",
        "--val-resize",
        "144",
    )
    assert job.wait(timeout=240) == 0, job.text()[-3000:]
    assert "no progress for" not in job.text()
    records = read_metrics(job.output)
    assert [r["epoch"] for r in records] == [1] and records[0]["val_seconds"] > timeout, records


@pytest.mark.horovod
def test_a_slow_checkpoint_write_does_not_stop_the_run(tiny_data, tmp_path):
    """Rank 0 held stopped for 0.75 T while its .tmp checkpoint file is open (as a write blocked in a slow
    file system is), rank 1 waiting in the next step: a silence shorter than T. The run ends 0."""
    timeout = 15  # s: 3 times the start-up here
    job = Job(
        tmp_path,
        two_ranks("--gloo"),
        tiny_data,
        "--epochs",
        "2",
        "--hang-timeout",
        str(timeout),
        *TINY_TRAIN,
        "--arch",
        "resnet50",
        "--image-size",
        "64",
        "--val-resize",
        "72",
    )
    writing = job.output / "checkpoints" / ".epoch-0001.pt.tmp"
    job.wait_for_output("epoch 1/2", timeout=240)
    rank_0 = job.trainer(0)
    while not writing.exists() and job.process.poll() is None:  # ResNet-50's 188 MB: a write of ~0.3 s here
        time.sleep(0.005)
    os.kill(rank_0, signal.SIGSTOP)
    stopped_mid_write = writing.exists()
    time.sleep(0.75 * timeout)
    os.kill(rank_0, signal.SIGCONT)
    assert job.wait(timeout=240) == 0, job.text()[-3000:]
    assert stopped_mid_write
    assert "no progress for" not in job.text()
    assert [r["epoch"] for r in read_metrics(job.output)] == [1, 2]


WRITES = {
    "synchronous": "checkpoint.save(Path(sys.argv[1]), big, keep=3)\n",
    "background": "writer = checkpoint.AsyncWriter(Path(sys.argv[1]), keep=3)\nwriter.submit(big)\n"
    "time.sleep(60)  # training goes on\n",
}


@pytest.mark.cli
@pytest.mark.parametrize("write", WRITES)
def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path, write):
    """A checkpoint write killed with -9 (the trainer's own, or rank 0 while its background writer writes):
    the previous checkpoint still loads, the partial file is never taken for a checkpoint, and the next save
    removes it."""
    directory = tmp_path / "checkpoints"
    state = checkpoint_state(model={"w": torch.ones(3)})
    checkpoint.save(directory, state, keep=3)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time, torch; from pathlib import Path; from hvd_imagenet import checkpoint\n"
                "big = {'model': {'w': torch.zeros(400_000_000, dtype=torch.uint8)}, 'optimizer': {}, 'epoch': 2,"
                " 'step': 12, 'step_in_epoch': 0, 'images_done': 0, 'partial': None, 'config': {}}\n" + WRITES[write]
            ),
            str(directory),
        ]
    )
    partial = directory / ".epoch-0002.pt.tmp"
    wait_for(lambda: partial.exists() and partial.stat().st_size > 0, 60, "the write to begin")
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert partial.exists() and not (directory / "epoch-0002.pt").exists()  # killed mid-write
    path, loaded = checkpoint.load_latest(directory)
    assert path.name == "epoch-0001.pt" and torch.equal(loaded["model"]["w"], torch.ones(3))
    checkpoint.save(directory, {**state, "epoch": 2, "step": 12}, keep=3)
    assert sorted(p.name for p in directory.iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]


@pytest.mark.unit
def test_corrupt_and_foreign_checkpoints_are_refused_without_running_code(tmp_path):
    directory = tmp_path / "checkpoints"
    state = checkpoint_state()
    checkpoint.save(directory, state, keep=0)
    newest = checkpoint.save(directory, {**state, "epoch": 2}, keep=0)

    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(UserError, match=r"cannot load .*epoch-0002.pt .*move it away to resume from epoch-0001.pt"):
        checkpoint.load_latest(directory)

    marker = tmp_path / "code-ran"

    class Payload:  # what a malicious "checkpoint" carries: code that runs when it is unpickled
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Payload()}, newest)
    with pytest.raises(UserError, match=r"cannot load .*epoch-0002.pt"):
        checkpoint.load_latest(directory)
    assert not marker.exists()

    torch.save({"weights": torch.ones(2)}, newest)  # a loadable file of some other program
    with pytest.raises(UserError, match="not a checkpoint of this version of hvd-imagenet"):
        checkpoint.load_latest(directory)


@pytest.mark.horovod
def test_corrupt_checkpoint_ends_resume_in_one_line(tiny_data, tmp_path):
    output = tmp_path / "run"
    train = ["--data", tiny_data, "--output", output, "--loader", "torchvision", *TINY_TRAIN]
    run_horovod("--epochs", "1", *train)
    newest = output / "checkpoints" / "epoch-0001.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    result = run_horovod("--epochs", "2", "--resume", *train, check=False)
    assert result.returncode != 0
    # one line from each rank; the only traceback is horovodrun's own, saying that a rank failed
    assert f"[0]<stderr>:hvd-imagenet train: error: rank 0: --resume: cannot load {newest}" in result.stderr
    assert f"[1]<stderr>:hvd-imagenet train: error: rank 1: --resume: cannot load {newest}" in result.stderr
    assert "<stderr>:Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.horovod
def test_resume_on_another_world_size(tiny_data, tmp_path):
    """2 ranks for epoch 1, then 1 rank (or 2 ranks with twice the virtual workers per pass): refused with what
    the linear scaling rule changes; with --allow-resize it trains on, at half the lr. --keep-checkpoints 1
    leaves only the newest."""
    output = tmp_path / "run"
    train = ["--data", tiny_data, "--output", output, "--loader", "torchvision", "--keep-checkpoints", "1", *TINY_TRAIN]
    run_horovod("--epochs", "1", *train)
    refused = run_horovod("--epochs", "2", "--resume", *train, np=1, check=False)
    assert refused.returncode != 0
    assert (
        "was written by 2 ranks at global batch kn=8 (peak lr 0.003125, 6 steps/epoch); this run has 1 ranks "
        "and kn=4, so by the linear scaling rule (Sec. 2.1) its peak lr is 0.001563, and an epoch is 12 steps"
        in refused.stderr
    ), refused.stderr[-2000:]
    assert "--allow-resize" in refused.stderr
    # The same 2 ranks with 2 virtual workers per pass: another global batch, refused the same way
    doubled = run_horovod("--epochs", "2", "--resume", "--virtual-workers-per-pass", "2", *train, check=False)
    assert doubled.returncode != 0
    assert (
        "was written by 2 ranks at global batch kn=8 (peak lr 0.003125, 6 steps/epoch); this run has 2 ranks "
        "and kn=16, so by the linear scaling rule (Sec. 2.1) its peak lr is 0.00625, and an epoch is 3 steps"
        in doubled.stderr
    ), doubled.stderr[-2000:]

    run_horovod("--epochs", "2", "--resume", "--allow-resize", *train, np=1)
    records = read_metrics(output)
    assert [(r["epoch"], r["world_size"], r["global_batch"]) for r in records] == [(1, 2, 8), (2, 1, 4)]
    assert records[1]["lr"] == pytest.approx(0.1 * 4 / 256 * 0.1)  # kn=4's peak lr, x0.1 after epoch 1
    assert records[1]["train_images"] == 48
    assert [p.name for p in checkpoint.list_checkpoints(output / "checkpoints")] == ["epoch-0002.pt"]


@pytest.mark.unit
@pytest.mark.parametrize(("done_before", "k_before", "k_after"), [(0, 4, 4), (24, 4, 3), (32, 8, 2), (96, 2, 5)])
def test_an_epoch_continued_on_another_world_size_reads_every_image_once(done_before, k_before, k_after):
    """images_done counts a prefix of the epoch's shuffle: the images read before (whatever k) and the
    shards after the resize partition the epoch, less the tail that does not divide among the new ranks."""
    num, seed, epoch = 101, 3, 2
    before = {i for r in range(k_before) for i in train_shard(num, seed, epoch, r, k_before)[: done_before // k_before]}
    after = [i for r in range(k_after) for i in train_shard(num, seed, epoch, r, k_after, done_before)]
    assert len(before) == done_before and not before & set(after) and len(after) == len(set(after))
    assert len(before) + len(after) == done_before + (num - done_before) // k_after * k_after


@pytest.mark.horovod
def test_diverging_training_stops_and_names_the_last_good_checkpoint(tiny_data, tmp_path):
    """An absurd lr makes the weights overflow within a few steps: every rank stops at the same step, exit
    status 3, one line naming the step and the last good checkpoint, which is left as it was."""
    output = tmp_path / "run"
    train = ["--data", tiny_data, "--output", output, "--loader", "torchvision", *TINY_TRAIN]
    run_horovod("--epochs", "1", *train)
    good = output / "checkpoints" / "epoch-0001.pt"
    before = good.read_bytes()
    result = run_horovod("--epochs", "20", "--resume", "--base-lr", "1e12", *train, check=False)
    assert result.returncode != 0 and "Exit code: 3" in result.stdout + result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "NaN/inf in the averaged gradients" in line]
    assert len(lines) == 1, result.stderr[-3000:]  # rank 0 speaks for both
    assert f"last good checkpoint {good}" in lines[0] and "of epoch" in lines[0]
    record = json.loads((output / "diverged.json").read_text())  # for scripts (`study` reads it)
    assert record["epoch"] == 2 and record["message"] in lines[0]
    assert good.read_bytes() == before
    assert [p.name for p in checkpoint.list_checkpoints(output / "checkpoints")][-1] == "epoch-0001.pt"


@pytest.mark.horovod
def test_skip_nonfinite_counts_skipped_steps_and_keeps_the_weights_finite(tiny_data, tmp_path):
    output = tmp_path / "run"
    run_horovod(
        "--data",
        tiny_data,
        "--output",
        output,
        "--loader",
        "torchvision",
        "--epochs",
        "3",
        "--base-lr",
        "1e12",
        "--skip-nonfinite",
        *TINY_TRAIN,
    )
    records = read_metrics(output)
    skipped = [r["skipped_steps"] for r in records]
    assert sum(skipped) > 0 and all(0 <= s <= 6 for s in skipped), skipped
    assert [r["train_images"] for r in records] == [48 - 8 * s for s in skipped]  # skipped steps not counted
    # No NaN/inf gradient was applied: every parameter is finite. (BN running statistics are not protected
    # so: at this lr a step with finite gradients already overflows a running variance.)
    weights = torch.load(output / "checkpoints" / "epoch-0003.pt", weights_only=True)["model"]
    parameters = [w for name, w in weights.items() if not name.endswith(("running_mean", "running_var", "tracked"))]
    assert parameters and all(torch.isfinite(w).all() for w in parameters)


def elastic_job(tiny_data, tmp_path, hosts_before: str, hosts_after: str, np: int, epochs: int, extra=()) -> Job:
    """horovodrun elastic on this machine: "localhost" and "127.0.0.1" are two hosts to Horovod, both local.
    The discovery script switches from hosts_before to hosts_after once epoch 1's checkpoint exists, so the
    change lands in epoch 2 or later (noticed at the next commit, every 2 steps)."""
    output = tmp_path / "run"
    script = tmp_path / "discover_hosts.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"if [ -e {output}/checkpoints/epoch-0001.pt ]; then printf '{hosts_after}'; "
        f"else printf '{hosts_before}'; fi\n"
    )
    script.chmod(0o755)
    # --network-interface: without it Horovod's elastic driver waits for 2 hosts to probe their common
    # interfaces, and a job that starts on one host never starts.
    launch = [
        "-np",
        str(np),
        "--min-np",
        "1",
        "--max-np",
        "2",
        "--network-interface",
        "lo",
        "--host-discovery-script",
        str(script),
    ]
    return Job(
        tmp_path,
        launch,
        tiny_data,
        "--elastic",
        "--elastic-commit-steps",
        "2",
        "--epochs",
        str(epochs),
        *TINY_TRAIN,
        *extra,
    )


def finish(job: Job) -> tuple[str, list[dict]]:
    """The job's output and metrics records, once it has ended 0."""
    assert job.wait(timeout=300) == 0, job.text()[-6000:]
    return job.text(), read_metrics(job.output)


def world_sizes_change_once(records: list[dict], before: int, after: int) -> int:
    """How many epochs ended on `before` ranks, checking that all the others ended on `after`, and at least
    one on each."""
    sizes = [r["world_size"] for r in records]
    changed = sizes.index(after) if after in sizes else len(sizes)
    assert 1 <= changed < len(sizes) and sizes == [before] * changed + [after] * (len(sizes) - changed), sizes
    return changed


@pytest.mark.horovod
def test_elastic_job_loses_a_worker_and_finishes(tiny_data, tmp_path):
    """2 workers; in epoch 2 the discovery script drops one host. The other goes on alone: global batch
    8 -> 4, lr halved (linear scaling rule), epoch 2 finished from where the last commit left it with
    every image read once, epoch 3 on one worker."""
    job = elastic_job(tiny_data, tmp_path, "localhost:1\\n127.0.0.1:1\\n", "localhost:1\\n", np=2, epochs=3)
    output, records = finish(job)
    assert "elastic: 2 -> 1 ranks; global batch 8 -> 4" in output
    assert [(r["epoch"], r["world_size"]) for r in records] == [(1, 2), (2, 1), (3, 1)]
    assert [r["train_images"] for r in records] == [48, 48, 48]
    assert records[2]["lr"] == pytest.approx(0.1 * 4 / 256 * 0.1)
    assert all(math.isfinite(r["val_loss"]) for r in records)


@pytest.mark.horovod
def test_elastic_job_loses_a_worker_killed_with_9_and_finishes(tiny_data, tmp_path):
    """kill -9 of one of 2 workers in epoch 2 (a failure, not a removal by the discovery script): the other
    rolls back to the last commit, goes on alone from there (global batch 8 -> 4, lr halved) and finishes.
    What is lost is the steps since that commit: each epoch still counts each of its 48 images once (the
    images read before and after the change partition the epoch: test_an_epoch_continued_...)."""
    both = "localhost:1\\n127.0.0.1:1\\n"
    job = elastic_job(tiny_data, tmp_path, both, both, np=2, epochs=4, extra=("--status-every", "0.001"))
    job.wait_for_output("epoch 2/4 step 3/6 ")  # a status line after every step: the commit at step 2 is done
    os.kill(job.trainer(1), signal.SIGKILL)
    output, records = finish(job)
    assert "elastic: 2 -> 1 ranks; global batch 8 -> 4" in output, output[-4000:]
    went_on = [line for line in output.splitlines() if "goes on from image" in line]
    assert len(went_on) == 1, output[-4000:]
    image = int(went_on[0].split("goes on from image ")[1].split()[0])
    assert image in (16, 32)  # the commit after step 2 or 4 of epoch 2 (every 2 steps, kn=8): what was kept
    world_sizes_change_once(records, before=2, after=1)
    assert [r["train_images"] for r in records] == [48] * 4
    assert records[-1]["lr"] == pytest.approx(0.1 * 4 / 256 * 0.1)
    assert all(math.isfinite(r["val_loss"]) for r in records)
    job.wait_until_all_gone()


@pytest.mark.horovod
def test_elastic_job_takes_in_a_worker_that_joins(tiny_data, tmp_path):
    """1 worker; after epoch 1 the discovery script adds a host. The newcomer starts (a few seconds here),
    gets rank 0's state and joins at a commit of epoch 2 or later; every epoch counts its 48 images once and
    the last ends with the same weights on both."""
    job = elastic_job(tiny_data, tmp_path, "localhost:1\\n", "localhost:1\\n127.0.0.1:1\\n", np=1, epochs=4)
    output, records = finish(job)
    assert "elastic: 1 -> 2 ranks; global batch 4 -> 8" in output
    world_sizes_change_once(records, before=1, after=2)
    assert [r["train_images"] for r in records] == [48] * 4
    digests = records[-1]["weights_digests"]
    assert len(digests) == 2 and len(set(digests)) == 1  # the newcomer holds the same weights


@pytest.mark.cli
def test_elastic_outside_an_elastic_launch_is_a_clear_error(tiny_data, tmp_path):
    result = run_cli("train", "--data", tiny_data, "--output", tmp_path / "run", "--elastic", *TINY_TRAIN)
    assert result.returncode == 2 and "--elastic: start the job with horovodrun --min-np" in result.stderr
