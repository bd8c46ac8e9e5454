"""Faults, each tried for real, each ending as docs/reliability.md says: a rank killed with -9 under both
controllers, a kill during a checkpoint write, corrupt and foreign checkpoints, a resume on another world
size, diverging training, and an elastic job that loses a worker and one that gains one.
(The SIGUSR1 stop-and-resume is in test_slurm.py; bad flags and bad data in test_cli.py.)"""
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from hvd_imagenet import checkpoint
from hvd_imagenet.data.shards import train_shard
from hvd_imagenet.errors import UserError

from conftest import BIN, TINY_TRAIN, cli_env, read_jsonl, run_cli, run_horovod


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


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
def test_kill_9_of_one_rank_ends_the_job_fast(tiny_data, tmp_path, controller):
    """kill -9 of rank 1 mid-epoch (no chance to say anything): the job ends within 60 s, non-zero, the
    launcher names rank 1, and no process of the job is left behind (loader workers included)."""
    marker = f"HVD_TEST_JOB={uuid.uuid4().hex}"
    log = tmp_path / "job.log"
    command = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", controller, "hvd-imagenet", "train",
               "--data", str(tiny_data), "--output", str(tmp_path / "run"), "--epochs", "100",
               "--loader", "torchvision", *TINY_TRAIN]
    env = {**cli_env(), marker.split("=")[0]: marker.split("=")[1]}
    with open(log, "w") as out:
        job = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: "epoch 1/100" in log.read_text(), 120, "training to start")
        time.sleep(2)  # well into the epoch loop
        victim = wait_for(lambda: trainer_of_rank(marker, 1), 10, "rank 1's process")
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        returncode = job.wait(timeout=60)
        took = time.monotonic() - killed
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    output = log.read_text()
    assert returncode != 0 and took < 60, (returncode, took, output[-3000:])
    if controller == "--gloo":  # horovodrun: "Process 1 exit with status code 137" ... "Process name: 1"
        assert "Process name: 1\nExit code: 137" in output, output[-3000:]
    else:  # mpirun: "mpirun noticed that process rank 1 with PID ... exited on signal 9 (Killed)."
        assert "process rank 1" in output and "signal 9" in output, output[-3000:]
    wait_for(lambda: not processes_with(marker), 10, "every process of the job to exit")


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    """checkpoint.save killed with -9 while it writes: the previous checkpoint still loads, the partial file
    is never taken for a checkpoint, and the next save removes it."""
    directory = tmp_path / "checkpoints"
    state = {"model": {"w": torch.ones(3)}, "optimizer": {}, "epoch": 1, "step": 6, "step_in_epoch": 0,
             "images_done": 0, "partial": None, "config": {}}
    checkpoint.save(directory, state, keep=3)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch; from pathlib import Path; from hvd_imagenet import checkpoint\n"
        "big = {'model': {'w': torch.zeros(400_000_000, dtype=torch.uint8)}, 'optimizer': {}, 'epoch': 2,"
        " 'step': 12, 'step_in_epoch': 0, 'images_done': 0, 'partial': None, 'config': {}}\n"
        "checkpoint.save(Path(sys.argv[1]), big, keep=3)\n"), str(directory)])
    partial = directory / ".epoch-0002.pt.tmp"
    wait_for(lambda: partial.exists() and partial.stat().st_size > 0, 60, "the write to begin")
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert partial.exists() and not (directory / "epoch-0002.pt").exists()  # killed mid-write
    path, loaded = checkpoint.load_latest(directory)
    assert path.name == "epoch-0001.pt" and torch.equal(loaded["model"]["w"], torch.ones(3))
    checkpoint.save(directory, {**state, "epoch": 2, "step": 12}, keep=3)
    assert sorted(p.name for p in directory.iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]


def test_corrupt_and_foreign_checkpoints_are_refused_without_running_code(tmp_path):
    directory = tmp_path / "checkpoints"
    state = {"model": {}, "optimizer": {}, "epoch": 1, "step": 6, "step_in_epoch": 0, "images_done": 0,
             "partial": None, "config": {}}
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


def test_resume_on_another_world_size(tiny_data, tmp_path):
    """2 ranks for epoch 1, then 1 rank: refused with what the linear scaling rule changes; with
    --allow-resize it trains on, at half the lr. --keep-checkpoints 1 leaves only the newest."""
    output = tmp_path / "run"
    train = ["--data", tiny_data, "--output", output, "--loader", "torchvision", "--keep-checkpoints", "1",
             *TINY_TRAIN]
    run_horovod("--epochs", "1", *train)
    refused = run_horovod("--epochs", "2", "--resume", *train, np=1, check=False)
    assert refused.returncode != 0
    assert "was written by 2 ranks at global batch kn=8 (peak lr 0.003125, 6 steps/epoch); this run has 1 ranks " \
           "and kn=4, so by the linear scaling rule (Sec. 2.1) its peak lr is 0.001563, and an epoch is 12 steps" \
           in refused.stderr, refused.stderr[-2000:]
    assert "--allow-resize" in refused.stderr

    run_horovod("--epochs", "2", "--resume", "--allow-resize", *train, np=1)
    records = read_jsonl(output / "metrics.jsonl")
    assert [(r["epoch"], r["world_size"], r["global_batch"]) for r in records] == [(1, 2, 8), (2, 1, 4)]
    assert records[1]["lr"] == pytest.approx(0.1 * 4 / 256 * 0.1)  # kn=4's peak lr, x0.1 after epoch 1
    assert records[1]["train_images"] == 48
    assert [p.name for p in checkpoint.list_checkpoints(output / "checkpoints")] == ["epoch-0002.pt"]


@pytest.mark.parametrize(("done_before", "k_before", "k_after"), [(0, 4, 4), (24, 4, 3), (32, 8, 2), (96, 2, 5)])
def test_an_epoch_continued_on_another_world_size_reads_every_image_once(done_before, k_before, k_after):
    """images_done counts a prefix of the epoch's shuffle: the images read before (whatever k) and the
    shards after the resize partition the epoch, less the tail that does not divide among the new ranks."""
    num, seed, epoch = 101, 3, 2
    before = {i for r in range(k_before) for i in train_shard(num, seed, epoch, r, k_before)[:done_before // k_before]}
    after = [i for r in range(k_after) for i in train_shard(num, seed, epoch, r, k_after, done_before)]
    assert len(before) == done_before and not before & set(after) and len(after) == len(set(after))
    assert len(before) + len(after) == done_before + (num - done_before) // k_after * k_after


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


def test_skip_nonfinite_counts_skipped_steps_and_keeps_the_weights_finite(tiny_data, tmp_path):
    output = tmp_path / "run"
    run_horovod("--data", tiny_data, "--output", output, "--loader", "torchvision", "--epochs", "3",
                "--base-lr", "1e12", "--skip-nonfinite", *TINY_TRAIN)
    records = read_jsonl(output / "metrics.jsonl")
    skipped = [r["skipped_steps"] for r in records]
    assert sum(skipped) > 0 and all(0 <= s <= 6 for s in skipped), skipped
    assert [r["train_images"] for r in records] == [48 - 8 * s for s in skipped]  # skipped steps not counted
    # No NaN/inf gradient was applied: every parameter is finite. (BN running statistics are not protected
    # so: at this lr a step with finite gradients already overflows a running variance.)
    weights = torch.load(output / "checkpoints" / "epoch-0003.pt", weights_only=True)["model"]
    parameters = [w for name, w in weights.items() if not name.endswith(("running_mean", "running_var", "tracked"))]
    assert parameters and all(torch.isfinite(w).all() for w in parameters)


def elastic_job(tiny_data, tmp_path, hosts_before: str, hosts_after: str, np: int, extra=()):
    """horovodrun elastic on this machine: "localhost" and "127.0.0.1" are two hosts to Horovod, both local.
    The discovery script switches from hosts_before to hosts_after once epoch 1's checkpoint exists, so the
    change lands in epoch 2 (noticed at the next commit, every 2 steps)."""
    output = tmp_path / "run"
    script = tmp_path / "discover_hosts.sh"
    script.write_text("#!/bin/sh\n"
                      f"if [ -e {output}/checkpoints/epoch-0001.pt ]; then printf '{hosts_after}'; "
                      f"else printf '{hosts_before}'; fi\n")
    script.chmod(0o755)
    # --network-interface: without it Horovod's elastic driver waits for 2 hosts to probe their common
    # interfaces, and a job that starts on one host never starts.
    command = [str(BIN / "horovodrun"), "-np", str(np), "--min-np", "1", "--max-np", "2", "--network-interface", "lo",
               "--host-discovery-script", str(script), "hvd-imagenet", "train", "--elastic",
               "--elastic-commit-steps", "2", "--data", str(tiny_data), "--output", str(output), "--epochs", "3",
               "--loader", "torchvision", *extra, *TINY_TRAIN]
    result = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return output, result


def test_elastic_job_loses_a_worker_and_finishes(tiny_data, tmp_path):
    """2 workers; in epoch 2 the discovery script drops one host. The other goes on alone: global batch
    8 -> 4, lr halved (linear scaling rule), epoch 2 finished from where the last commit left it with
    every image read once, epoch 3 on one worker."""
    output, result = elastic_job(tiny_data, tmp_path, "localhost:1\\n127.0.0.1:1\\n", "localhost:1\\n", np=2)
    assert "elastic: 2 -> 1 ranks; global batch 8 -> 4" in result.stdout
    records = read_jsonl(output / "metrics.jsonl")
    assert [(r["epoch"], r["world_size"]) for r in records] == [(1, 2), (2, 1), (3, 1)]
    assert [r["train_images"] for r in records] == [48, 48, 48]
    assert records[2]["lr"] == pytest.approx(0.1 * 4 / 256 * 0.1)
    assert all(math.isfinite(r["val_loss"]) for r in records)


def test_elastic_job_takes_in_a_worker_that_joins(tiny_data, tmp_path):
    output, result = elastic_job(tiny_data, tmp_path, "localhost:1\\n", "localhost:1\\n127.0.0.1:1\\n", np=1)
    assert "elastic: 1 -> 2 ranks; global batch 4 -> 8" in result.stdout
    records = read_jsonl(output / "metrics.jsonl")
    assert [(r["epoch"], r["world_size"]) for r in records] == [(1, 1), (2, 2), (3, 2)]
    assert [r["train_images"] for r in records] == [48, 48, 48]
    assert len(set(records[2]["weights_digests"])) == 1  # the newcomer holds the same weights


def test_elastic_outside_an_elastic_launch_is_a_clear_error(tiny_data, tmp_path):
    result = run_cli("train", "--data", tiny_data, "--output", tmp_path / "run", "--elastic", *TINY_TRAIN)
    assert result.returncode == 2 and "--elastic: start the job with horovodrun --min-np" in result.stderr
