"""How the bench-* commands start their ranks: under a launcher already (horovodrun, mpirun, srun), or as a
driver that starts `horovodrun -np N` on this machine, optionally inside a network namespace of its own whose
loopback is shaped with `tc` to a cluster link's rate.

Loopback is not a network: between two local ranks the "link" is a memory copy (tens of GB/s), so gradient
compression shows only its cost there. A namespace's own `lo`, rate-limited by a token bucket, carries the
ranks' TCP traffic at the rate of a real link. Both directions of the ring share that one `lo` (a real
full-duplex NIC gives each direction the rate), so allreduce times there are up to 2x a real link's: the
ratios between compressors hold, the absolute times are pessimistic.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .. import flags
from ..errors import UserError
from ..flags import opt

LINKS = {"loopback": None, "10gbit": 10e9, "1gbit": 1e9}  # --link: bits per second of the shaped lo
AS_COMMAND_OR_RANK = (
    "Run it as a command (it starts `horovodrun -np N` on this machine, inside a network namespace "
    "with a shaped lo for --link), or as every rank under a launcher (horovodrun, mpirun, srun)."
)
LAUNCHER_RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """The flags of a bench command that starts its own ranks, and its output."""

    controller: str = opt(
        "(as a command) Horovod's controller for the ranks it starts", "gloo", choices=("gloo", "mpi")
    )
    link: str = opt(
        "(as a command, root) run the ranks in a namespace whose lo is shaped to this rate",
        "loopback",
        choices=tuple(LINKS),
    )
    json: bool = opt("the report as JSON", False)
    result_file: str = opt(argparse.SUPPRESS, "")  # where rank 0 leaves its result for the driver that started it

    def __post_init__(self):
        flags.check(self)


def forward(command: str, options) -> list[str]:
    """The argv that makes each started rank run `options` (a bench command's, without its launch flags)."""
    return [command, *flags.to_argv(dataclasses.replace(options, launch=LaunchOptions()))]


def emit(report: dict, launch: LaunchOptions, format_report) -> None:
    """Rank 0's result: to --result-file for the driver that launched the ranks, else the table or JSON."""
    report = {**report, "command": "hvd-imagenet " + " ".join(sys.argv[1:])}
    if launch.result_file:
        Path(launch.result_file).write_text(json.dumps(report))
    else:
        print(json.dumps(report, indent=1) if launch.json else format_report(report))


def link_record(name: str, prefix: list[str]) -> dict:
    """What the ranks' link was: its name, whether shaped, and the TCP rate measured through it."""
    measured = measure_link(prefix) if prefix else None
    return {"name": name, "shaped": bool(prefix), "measured_gbit_s": measured and measured / 1e9}


def under_launcher() -> bool:
    """Whether a launcher started this process as one rank of several."""
    return any(name in os.environ for name in LAUNCHER_RANK_VARIABLES)


def launcher_rank_and_size() -> tuple[int, int, int, int]:
    """(rank, size, local rank, local size) from the launcher's environment (for DDP, which has no hvd.init)."""
    for prefix in ("HOROVOD_", "OMPI_COMM_WORLD_"):
        if f"{prefix}RANK" in os.environ:
            return tuple(int(os.environ[f"{prefix}{key}"]) for key in ("RANK", "SIZE", "LOCAL_RANK", "LOCAL_SIZE"))
    if "SLURM_PROCID" in os.environ:
        return (
            int(os.environ["SLURM_PROCID"]),
            int(os.environ["SLURM_NTASKS"]),
            int(os.environ["SLURM_LOCALID"]),
            int(os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]),
        )
    return 0, 1, 0, 1


def shaping_problem() -> str | None:
    """Why --link cannot be shaped here, or None."""
    if os.geteuid() != 0:
        return "--link needs root (a network namespace and tc); run as root, or use --link loopback"
    missing = [tool for tool in ("ip", "tc") if not shutil.which(tool)]
    if missing:
        return f"--link needs {' and '.join(missing)} (apt-get install iproute2)"
    return None


@contextlib.contextmanager
def shaped_namespace(link: str):
    """A fresh network namespace whose lo is limited to the link's rate; yields the command prefix that runs
    a program inside it (nothing for --link loopback)."""
    rate = LINKS[link]
    if rate is None:
        yield []
        return
    problem = shaping_problem()
    if problem:
        raise UserError(problem)
    name = f"hvd-bench-{os.getpid()}"
    run = lambda *args: subprocess.run(args, check=True, capture_output=True, text=True)  # noqa: E731
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        # A token bucket: `rate` on average; the bucket holds 1 ms of traffic (at least 2 of lo's 64 KiB packets).
        burst = max(int(rate / 8 / 1000), 2 * 65536)
        run(
            "ip",
            "netns",
            "exec",
            name,
            "tc",
            "qdisc",
            "add",
            "dev",
            "lo",
            "root",
            "tbf",
            "rate",
            f"{int(rate)}bit",
            "burst",
            str(burst),
            "latency",
            "100ms",
        )
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def measure_link(prefix: list[str], megabytes: int = 64, streams: int = 3) -> float:
    """Bits per second of a TCP stream over lo in the namespace (a check that the shaping took): the best of
    `streams` in a row, since a stall of this busy machine only ever lowers a stream's rate (one stream alone
    once read 0.78 of a 1 Gbit/s link here, with the tests running)."""
    code = (
        f"from hvd_imagenet.bench.launch import _tcp_rate; print(max(_tcp_rate({megabytes}) for _ in range({streams})))"
    )
    out = subprocess.run([*prefix, sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.strip())


def _tcp_rate(megabytes: int) -> float:
    server = socket.create_server(("127.0.0.1", 0))
    total = megabytes * 2**20

    def receive():
        connection, _ = server.accept()
        received = 0
        while received < total:
            received += len(connection.recv(1 << 20))
        connection.sendall(b"k")

    thread = threading.Thread(target=receive)
    thread.start()
    client = socket.create_connection(server.getsockname())
    chunk = b"\0" * (1 << 20)
    start = time.perf_counter()
    for _ in range(megabytes):
        client.sendall(chunk)
    client.recv(1)
    seconds = time.perf_counter() - start
    thread.join()
    return total * 8 / seconds


def launch_command(np: int, controller: str, module_args: list[str], shaped: bool, env: dict) -> list[str]:
    """`horovodrun -np N -H localhost:N --gloo|--mpi python -m hvd_imagenet.cli ARGS` with this Python. MPI on a
    shaped link uses mpirun itself: horovodrun passes `-mca btl ^openib`, which keeps Open MPI's shared-memory
    transport, and that would bypass the shaped lo; this forces TCP over lo."""
    python = [sys.executable, "-m", "hvd_imagenet.cli", *module_args]
    if controller == "mpi" and shaped:
        exported = [arg for name in ("PATH", *env) for arg in ("-x", name)]
        return [
            "mpirun",
            "--allow-run-as-root",
            "-np",
            str(np),
            "--bind-to",
            "none",
            "--mca",
            "pml",
            "ob1",
            "--mca",
            "btl",
            "self,tcp",
            "--mca",
            "btl_tcp_if_include",
            "lo",
            "--mca",
            "oob_tcp_if_include",
            "lo",
            *exported,
            *python,
        ]
    horovodrun = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")
    return [horovodrun, "-np", str(np), "-H", f"localhost:{np}", f"--{controller}", *python]


def run_ranks(
    prefix: list[str], np: int, controller: str, module_args: list[str], env: dict | None = None, timeout: float = 3600
) -> dict:
    """Run `hvd-imagenet ARGS --result-file F` on np local ranks (in the namespace of `prefix`); rank 0's JSON
    result from F."""
    env = env or {}
    with tempfile.TemporaryDirectory() as scratch:
        result_file = Path(scratch) / "result.json"
        command = [
            *prefix,
            *launch_command(np, controller, [*module_args, "--result-file", str(result_file)], bool(prefix), env),
        ]
        environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **env}
        done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
        if done.returncode != 0 or not result_file.exists():
            lines = (done.stdout + done.stderr).strip().splitlines()
            ranks = [line for line in lines if "<stderr>" in line][-20:]  # the ranks' own errors, then the launcher's
            tail = "\n".join(ranks + lines[-8:])
            raise UserError(f"{' '.join(command)} failed (exit {done.returncode}):\n{tail}")
        return json.loads(result_file.read_text())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
