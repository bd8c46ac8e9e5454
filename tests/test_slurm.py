"""slurm/train_resnet50.sbatch, unmodified, on a real SLURM started by the tests (tests/slurm_cluster.py).

On this machine: one node, 2 tasks, CPU, tiny data, the 32x8 headers overridden on the sbatch command line as
a user would. Then the 32 x 8 GPU topology on 32 emulated nodes with the script's own headers and a stub in
place of the trainer. The tests skip, saying why, where SLURM cannot be started (not root, not installed).
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_env, wait_for
from slurm_cluster import LocalSlurm, unavailable_reason

from hvd_imagenet.metrics import read_metrics

SBATCH = Path(__file__).resolve().parent.parent / "slurm" / "train_resnet50.sbatch"
# This machine in place of 32 nodes x 8 GPUs: what a user changes on the command line, nothing in the script.
ONE_CPU_NODE = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
TINY = "--arch resnet18 --image-size 32 --val-resize 36 --warmup-epochs 1 --lr-steps 1 --workers 1 --loader torchvision"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(unavailable_reason() is not None, reason=f"no local SLURM: {unavailable_reason()}"),
]


@pytest.fixture(scope="module")
def slurm():
    cluster = LocalSlurm.start()
    yield cluster
    cluster.stop()


def job_env(cluster: LocalSlurm, data: Path, output: Path, train_args: str) -> dict:
    return {
        **cli_env(),
        **cluster.env,
        "DATA_DIR": str(data),
        "OUTPUT_DIR": str(output),
        "TRAIN_ARGS": train_args,
        # Open MPI between the ranks over TCP on loopback (the script's UCX default wants a fabric)
        "OMPI_MCA_pml": "ob1",
        "OMPI_MCA_btl": "self,tcp",
    }


def sbatch(env: dict, log_dir: Path, *options: str, wait: bool = True) -> tuple[int, str]:
    """Submit the script; with wait, block until it ends. Returns (exit status of sbatch, job id)."""
    command = ["sbatch", "--parsable", f"--output={log_dir}/%j.out", *options, str(SBATCH)]
    if wait:
        command.insert(1, "--wait")
    result = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    job_id = result.stdout.readline().strip().split(";")[0]
    result.wait(timeout=300)
    assert job_id, result.stderr.read()
    return result.returncode, job_id


def job_log(log_dir: Path, job_id: str) -> str:
    path = log_dir / f"{job_id}.out"
    return path.read_text().replace("\r", "\n") if path.exists() else ""


def wait_until_gone(cluster: LocalSlurm, job_id: str, timeout: float) -> None:
    def gone() -> bool:
        squeue = ["squeue", "-h", "-j", job_id, "-o", "%T"]
        return not subprocess.run(squeue, capture_output=True, text=True, env=cluster.env).stdout.strip()

    wait_for(gone, timeout, f"job {job_id} to leave the queue", interval=1)


def test_sbatch_trains_on_local_slurm(slurm, tiny_data, tmp_path):
    output = tmp_path / "run"
    status, job_id = sbatch(
        job_env(slurm, tiny_data, output, f"--epochs 1 --batch-size 4 {TINY}"), tmp_path, *ONE_CPU_NODE
    )
    log = job_log(tmp_path, job_id)
    assert status == 0, log
    config = json.loads((output / "config.json").read_text())  # written by rank 0
    assert config["world_size"] == 2 and config["controller"] == "MPI"  # srun --mpi=pmix started Horovod on MPI
    assert config["resume"] is True  # the script always resumes; the first start found no checkpoint
    records = read_metrics(output)
    assert [r["epoch"] for r in records] == [1] and records[0]["val_images"] == 20
    assert records[0]["weights_digests"][0] == records[0]["weights_digests"][1]
    assert (output / "checkpoints" / "epoch-0001.pt").exists()
    assert f"job {job_id} (start 1): 1 nodes x 2 tasks" in log and "no checkpoint in" in log


@pytest.mark.parametrize("loader", ["torchvision", "dali --checkpoint-every 2"])
def test_sigusr1_checkpoints_requeues_and_resumes_exactly(slurm, tiny_data, tmp_path, loader):
    """SLURM's pre-emption warning mid-epoch: every rank stops at one step, rank 0 checkpoints (whatever
    --checkpoint-every says), the job requeues itself and continues. The result equals an uninterrupted job's:
    the same losses and accuracies and bit-identical weights (BN running statistics to float rounding: they
    are averaged at the stop). DALI too: its crops are per-image draws, so the resumed epoch crops as the
    uninterrupted one did."""
    tiny = TINY.replace("--loader torchvision", f"--loader {loader}")
    train = f"--epochs 2 --batch-size 2 {tiny}"  # 12 steps per epoch: the stop check at step 10 falls inside
    whole, split = tmp_path / "whole", tmp_path / "split"
    status, _ = sbatch(job_env(slurm, tiny_data, whole, train), tmp_path, *ONE_CPU_NODE)
    assert status == 0

    _, job_id = sbatch(job_env(slurm, tiny_data, split, train), tmp_path, *ONE_CPU_NODE, wait=False)
    wait_for(  # every rank has its signal handler by then
        lambda: "hvd-imagenet: resnet18" in job_log(tmp_path, job_id),
        120,
        "the job's start",
        interval=0.5,
        detail=lambda: job_log(tmp_path, job_id),
    )
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, env=slurm.env)  # to every task, not the shell
    wait_until_gone(slurm, job_id, timeout=240)

    log = job_log(tmp_path, job_id)
    assert "SIGUSR1: stopped at step 10/12 of epoch 1" in log, log
    assert f"requeueing job {job_id}" in log and f"job {job_id} (start 2)" in log
    assert "continuing from" in log and "epoch-0000-step-000010.pt (0 epochs and 10 steps done)" in log
    assert not (split / "stopped.json").exists()  # the second start cleared it and finished
    a, b = read_metrics(whole), read_metrics(split)
    assert [r["epoch"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        for key in ("lr", "train_loss", "train_top1", "steps", "val_images"):
            assert x[key] == y[key], key
        for key in ("val_loss", "val_top1", "val_top5"):
            assert x[key] == pytest.approx(y[key], rel=1e-5), key
    wa = torch.load(whole / "checkpoints" / "epoch-0002.pt", weights_only=True)["model"]
    wb = torch.load(split / "checkpoints" / "epoch-0002.pt", weights_only=True)["model"]
    for name in wa:
        if name.endswith(("running_mean", "running_var")):
            assert torch.allclose(wa[name], wb[name], rtol=1e-5, atol=1e-6), name
        else:
            assert torch.equal(wa[name], wb[name]), name


def test_staging_copies_the_shards_to_each_node_once_and_trains_from_the_copies(tiny_shards, tmp_path):
    """STAGE_DIR on 2 emulated nodes, one task each, the script unmodified: one task per node copies the packed
    shards to its node's directory (%n), then the 2 ranks train from their node's copy over MPI between the
    nodes. The next job finds both copies identical and copies nothing but the one file damaged in between."""
    cluster = LocalSlurm.start(nodes=2, cpus_per_node=1)
    try:
        stage = tmp_path / "stage"
        env = {
            **job_env(cluster, tiny_shards, tmp_path / "first", f"--epochs 1 --batch-size 4 {TINY} --loader dali"),
            "STAGE_DIR": f"{stage}/%n",
            # Open MPI between "nodes" that are one machine: TCP on loopback (the environment's notes)
            "OMPI_MCA_btl_tcp_if_include": "lo",
            "OMPI_MCA_oob_tcp_if_include": "lo",
        }
        two_nodes = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
        status, job_id = sbatch(env, tmp_path, *two_nodes)
        log = job_log(tmp_path, job_id)
        assert status == 0, log
        files = sorted(p.name for p in tiny_shards.iterdir())
        for node in ("node01", "node02"):
            assert f"stage ({node}): copied {len(files) - 1} files" in log, log  # and index.json last
            assert sorted(p.name for p in (stage / node).iterdir()) == files
            assert all((stage / node / name).read_bytes() == (tiny_shards / name).read_bytes() for name in files)
        config = json.loads((tmp_path / "first" / "config.json").read_text())
        assert config["data"] == f"{stage}/node01" and config["world_size"] == 2  # rank 0 read node01's copy
        assert config["input"].endswith("read from packed shards by 8 threads")
        records = read_metrics(tmp_path / "first")
        assert records[0]["val_images"] == 20 and records[0]["train_images"] == 48
        assert records[0]["weights_digests"][0] == records[0]["weights_digests"][1]

        damaged = stage / "node02" / "train-000001.tar"
        damaged.write_bytes(damaged.read_bytes()[:512])
        status, job_id = sbatch({**env, "OUTPUT_DIR": str(tmp_path / "second")}, tmp_path, *two_nodes)
        log = job_log(tmp_path, job_id)
        assert status == 0, log
        assert "stage (node01): an identical copy is in" in log and "nothing copied" in log, log
        assert "stage (node02): copied 1 files" in log and f"kept {len(files) - 2} already there" in log, log
        assert damaged.read_bytes() == (tiny_shards / damaged.name).read_bytes()
    finally:
        cluster.stop()


def task_trainer(job_id: str, task: int) -> int | None:
    """The PID of task `task`'s `hvd-imagenet train` process in SLURM job `job_id`."""
    wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={task}".encode()}
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:  # not a process, gone, or not ours to read
            continue
        if any(part.endswith(b"hvd-imagenet") for part in command) and b"train" in command and wanted <= environ:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_hung_task_ends_the_job_step_within_the_hang_timeout(slurm, tiny_data, tmp_path):
    """Task 1 stopped with SIGSTOP in epoch 2, under srun --mpi=pmix as the cluster runs it: task 0's
    watchdog ends task 0 after HANG_TIMEOUT, srun (--kill-on-bad-exit) ends the step, the stopped task
    included, and the job ends failed, without a requeue."""
    hang_timeout = 20  # s: 3-5 times the start-up to the first step here
    env = {
        **job_env(slurm, tiny_data, tmp_path / "run", f"--epochs 100 --batch-size 4 {TINY}"),
        "HANG_TIMEOUT": str(hang_timeout),
    }
    _, job_id = sbatch(env, tmp_path, *ONE_CPU_NODE, wait=False)
    wait_for(  # epoch 1's checkpoint is written by then
        lambda: "epoch 2/100" in job_log(tmp_path, job_id),
        120,
        "epoch 2 to start",
        interval=0.5,
        detail=lambda: job_log(tmp_path, job_id),
    )
    victim = task_trainer(job_id, 1)
    assert victim, job_log(tmp_path, job_id)
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    wait_until_gone(slurm, job_id, timeout=hang_timeout + 60)
    took = time.monotonic() - stopped
    log = job_log(tmp_path, job_id)
    assert took < hang_timeout + 30, (took, log[-3000:])
    assert "rank 0 (host" in log and f"(--hang-timeout {hang_timeout}) in training" in log, log[-3000:]
    assert "task 0: Exited with exit code 4" in log, log[-3000:]  # srun names the task and its status
    assert "requeueing" not in log and not (tmp_path / "run" / "stopped.json").exists()
    assert task_trainer(job_id, 0) is None and task_trainer(job_id, 1) is None


STUB = """#!/bin/bash
# Stands in for hvd-imagenet: reports where SLURM placed this task, which GPU the trainer would take
# (comm.init: cuda:<local rank> among the GPUs the task sees) and the CPUs per task srun was asked for.
IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
cpus=${SRUN_CPUS_PER_TASK:-unset}
echo "TASK $SLURMD_NODENAME $SLURM_LOCALID $SLURM_PROCID ${gpus[$SLURM_LOCALID]} $SLURM_NTASKS $cpus"
"""


def submit_unmodified(cluster: LocalSlurm, script: str, workdir: Path, stub: Path) -> str:
    """sbatch --wait with no option but the script, from `workdir` (a stand-in for the repository root);
    returns the job's log, which the script's own --output header names."""
    env = {
        **cli_env(),
        **cluster.env,
        "HVD_IMAGENET": str(stub),
        "DATA_DIR": str(workdir / "data"),
        "OUTPUT_DIR": str(workdir / "run"),
    }
    result = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"slurm/{script}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
        timeout=300,
    )
    job_id = result.stdout.strip().split(";")[0]
    logs = list((workdir / "logs").glob(f"*-{job_id}.out"))
    log = logs[0].read_text() if logs else "(no log)"
    assert result.returncode == 0, result.stderr + log
    return log


def placements(log: str, tasks: int) -> dict[str, list[tuple[int, int]]]:
    """node -> sorted (local rank, GPU) of its tasks, after checking the global ranks and task count, and
    that srun passed the header's --cpus-per-task=12 on to every task (SLURM >= 22.05 does not by itself; this
    SLURM binds no CPUs, task/none, so the export is what can be seen here)."""
    reports = [line.split()[1:] for line in log.splitlines() if line.startswith("TASK ")]
    assert len(reports) == tasks and all(r[4] == str(tasks) for r in reports)
    assert sorted(int(r[2]) for r in reports) == list(range(tasks))  # global ranks, each once
    assert {r[5] for r in reports} == {"12"}
    nodes: dict[str, list[tuple[int, int]]] = {}
    for node, local, _, gpu, _, _ in reports:
        nodes.setdefault(node, []).append((int(local), int(gpu)))
    return {node: sorted(pairs) for node, pairs in nodes.items()}


def test_unmodified_headers_place_tasks_on_emulated_gpu_nodes(tmp_path):
    """The scripts' own #SBATCH headers (no overrides) on 32 emulated nodes with 8 fake GPUs each: accepted;
    train_resnet50.sbatch gives each of its 256 tasks its own (node, local rank, GPU), and
    train_single_node.sbatch its 8 tasks the 8 GPUs of one node."""
    stub = tmp_path / "stub.sh"
    stub.write_text(STUB)
    stub.chmod(0o755)
    (tmp_path / "logs").mkdir()  # the headers' --output=logs/%x-%j.out, relative to the submit directory
    (tmp_path / "slurm").symlink_to(SBATCH.parent)
    cluster = LocalSlurm.start(nodes=32, gpus_per_node=8, cpus_per_node=96)
    try:
        full = submit_unmodified(cluster, "train_resnet50.sbatch", tmp_path, stub)
        single = submit_unmodified(cluster, "train_single_node.sbatch", tmp_path, stub)
    finally:
        cluster.stop()
    nodes = placements(full, 256)
    assert sorted(nodes) == [f"node{i:02d}" for i in range(1, 33)]
    for node, pairs in nodes.items():
        assert pairs == [(i, i) for i in range(8)], node  # local ranks 0-7, each with its own GPU
    assert "32 nodes x 8 tasks" in full  # the line the script prints at start
    nodes = placements(single, 8)
    assert len(nodes) == 1 and list(nodes.values())[0] == [(i, i) for i in range(8)]
    assert "1 nodes x 8 tasks" in single


APPTAINER = """#!/bin/bash
# Stands in for apptainer: prints the directories the container would see (--bind) and the command, then runs
# the command on the host.
shift  # exec
while [ "$1" = --nv ] || [ "$1" = --bind ]; do
  if [ "$1" = --bind ]; then echo "BIND $2"; shift; fi
  shift
done
shift  # the image
echo "RUN $*"
exec "$@"
"""


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_a_container_job_mounts_every_directory_it_writes(slurm, tmp_path, staged):
    """CONTAINER_RUNTIME=apptainer with OUTPUT_DIR and CHECKPOINT_DIR outside the submit directory: both are
    bound into the container (else checkpoints would be written inside it and lost), the data read-only. With
    STAGE_DIR (here with %n) its part before %n is bound too, `stage` runs once per node in the container and
    the trainers read the staged copy."""
    for name, text in (("apptainer", APPTAINER), ("stub.sh", STUB)):
        (tmp_path / "bin").mkdir(exist_ok=True)
        (tmp_path / "bin" / name).write_text(text)
        (tmp_path / "bin" / name).chmod(0o755)
    workdir, data = tmp_path / "repo", tmp_path / "data"
    workdir.mkdir()
    data.mkdir()
    output, checkpoints = tmp_path / "out" / "run", tmp_path / "fast" / "ckpt"
    env = {
        **cli_env(),
        **slurm.env,
        "PATH": f"{tmp_path / 'bin'}:{cli_env()['PATH']}",
        "HVD_IMAGENET": str(tmp_path / "bin" / "stub.sh"),
        "DATA_DIR": str(data),
        "OUTPUT_DIR": str(output),
        "CHECKPOINT_DIR": str(checkpoints),
        "CONTAINER_RUNTIME": "apptainer",
        "CONTAINER_IMAGE": "image.sif",
    }
    local = tmp_path / "local"
    if staged:
        env["STAGE_DIR"] = f"{local}/%n"
    result = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"--output={tmp_path}/%j.out", *ONE_CPU_NODE, str(SBATCH)],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
        timeout=300,
    )
    log = job_log(tmp_path, result.stdout.strip().split(";")[0])
    assert result.returncode == 0, result.stderr + log
    binds = {line.split()[1] for line in log.splitlines() if line.startswith("BIND ")}
    assert binds == {f"{data}:{data}:ro", str(workdir), str(output), str(checkpoints)} | (
        {str(local)} if staged else set()
    ), log
    runs = [line.split()[2:] for line in log.splitlines() if line.startswith("RUN ")]
    stages = [run for run in runs if run[0] == "stage"]
    trains = [run for run in runs if run[0] == "train"]
    assert stages == ([["stage", "--shards", str(data), "--to", f"{local}/%n"]] if staged else []), log
    assert len(trains) == 2 and all(
        run[run.index("--data") + 1] == (f"{local}/%n" if staged else str(data)) for run in trains
    ), log
    assert len([line for line in log.splitlines() if line.startswith("TASK ")]) == 2 + staged
