"""A real SLURM cluster on 127.0.0.1 for the tests: munged, slurmctld and one slurmd per node, each started
here, as root, from Debian's packages (slurm-wlm 22.05, munge), with every file under one directory.

Two shapes: the machine itself as one node (`LocalSlurm.start(tmp, nodes=None)`: its real cores, no GPU), or
N emulated nodes with fake GPUs (`nodes=32, gpus_per_node=8`): N slurmd daemons on distinct ports, GPUs as
character devices so that SLURM's gres accepts them (nothing opens them). `stop()` ends the daemons it
started, by pid. The facts behind each setting are in the project's notes on the environment.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

from conftest import poll, wait_for

DAEMONS = ("munged", "slurmctld", "slurmd", "mungekey", "sbatch", "scontrol", "sinfo")


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "starting SLURM daemons needs root"
    missing = [name for name in DAEMONS if not shutil.which(name)]
    if missing:
        return f"not installed: {', '.join(missing)} (make setup installs slurmctld slurmd slurm-client munge)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, base: Path, nodes: int | None, gpus_per_node: int, cpus_per_node: int):
        self.base, self.nodes, self.gpus_per_node, self.cpus_per_node = base, nodes, gpus_per_node, cpus_per_node
        self.conf = base / "slurm.conf"
        self.pids: list[int] = []
        self.node_names = [f"node{i:02d}" for i in range(1, nodes + 1)] if nodes else [socket.gethostname()]

    @classmethod
    def start(cls, nodes: int | None = None, gpus_per_node: int = 0, cpus_per_node: int = 0) -> LocalSlurm:
        # Not under pytest's tmp_path: the munge user must reach its directory (pytest's are root-only).
        base = Path(tempfile.mkdtemp(prefix="hvd-slurm-"))
        base.chmod(0o755)
        cluster = cls(base, nodes, gpus_per_node, cpus_per_node or os.cpu_count())
        try:
            cluster._start()
        except Exception:
            cluster.stop()
            raise
        return cluster

    @property
    def env(self) -> dict:
        """The environment for sbatch/squeue/scontrol against this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _start(self) -> None:
        munge = self.base / "munge"
        munge.mkdir()
        munge.chmod(0o755)  # munged wants its socket's directory executable by all, and the key private
        key = munge / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        shutil.chown(munge, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        socket_path = munge / "munge.socket"
        self._spawn(
            [
                "runuser",
                "-u",
                "munge",
                "--",
                "munged",
                "--foreground",
                f"--socket={socket_path}",
                f"--key-file={key}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
                "--num-threads=16",
            ],
            "munged",
        )
        self._wait_for(socket_path.exists, "munged's socket", self.base / "munged.stdout")

        self._write_config(socket_path)
        self._spawn(["slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
        self._wait_for(lambda: self._scontrol("ping").returncode == 0, "slurmctld", self.base / "slurmctld.log")
        for name in self.node_names:
            self._spawn(["slurmd", "-D", "-N", name, "-f", str(self.conf)], f"slurmd-{name}")
        self._wait_for(
            self._nodes_idle, f"{len(self.node_names)} idle node(s)", self.base / "slurmctld.log", timeout=60
        )

    def _write_config(self, munge_socket: Path) -> None:
        base = self.base
        for sub in ("state", "log"):
            (base / sub).mkdir()
        for name in self.node_names:
            (base / "spool" / name).mkdir(parents=True)
            (base / "tmp" / name).mkdir(parents=True)
        lines = [
            "ClusterName=hvdtest",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root",
            # cred_expire: SLURM holds a requeued job back for cred_expire + 1 s (default 120)
            f"AuthInfo=socket={munge_socket},cred_expire=5",
            f"StateSaveLocation={base / 'state'}",
            f"SlurmdSpoolDir={base / 'spool'}/%n",
            f"TmpFS={base / 'tmp'}/%n",  # PMIx keeps per-node files here: one directory per emulated node
            f"SlurmctldPidFile={base / 'slurmctld.pid'}",
            f"SlurmdPidFile={base / 'log'}/slurmd-%n.pid",
            f"SlurmctldLogFile={base / 'slurmctld.log'}",
            f"SlurmdLogFile={base / 'log'}/slurmd-%n.log",
            # No cgroups in this container: track processes by parentage, no task binding or accounting.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={base / 'jobcomp.txt'}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=pmix",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=4",
            "SchedulerParameters=batch_sched_delay=0",  # sbatch --wait sees the end in seconds
            "EnforcePartLimits=ALL",  # a job that can never fit is refused at submit, not left pending
            "SlurmdParameters=config_overrides",  # emulated nodes may claim more cores than the host has
            "KillWait=10",
        ]
        if self.gpus_per_node:
            lines.append("GresTypes=gpu")
            devices = base / "dev"
            devices.mkdir()
            for minor in range(self.gpus_per_node):  # NVIDIA's major number; never opened
                subprocess.run(["mknod", str(devices / f"nvidia{minor}"), "c", "195", str(minor)], check=True)
            (base / "gres.conf").write_text(f"Name=gpu File={devices}/nvidia[0-{self.gpus_per_node - 1}]\n")
        gres = f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""
        for name in self.node_names:
            lines.append(
                f"NodeName={name} NodeAddr=127.0.0.1 Port={free_port()} CPUs={self.cpus_per_node} "
                f"RealMemory=1000{gres} State=UNKNOWN"
            )
        lines.append(f"PartitionName=test Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, command: list[str], name: str) -> None:
        log = open(self.base / f"{name}.stdout", "w")
        self.pids.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True).pid)

    def _scontrol(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, env=self.env, timeout=30)

    def _nodes_idle(self) -> bool:
        result = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env, timeout=30
        )
        states = [line.split()[1] for line in result.stdout.splitlines() if line.strip()]
        return len(states) == len(self.node_names) and all(s == "idle" for s in states)

    def _wait_for(self, condition, what: str, log: Path, timeout: float = 30) -> None:
        def tail() -> str:
            return f"{log}:\n" + (log.read_text()[-2000:] if log.exists() else "(no log)")

        wait_for(condition, timeout, f"local SLURM: {what}", detail=tail)

    def stop(self) -> None:
        """End every daemon started here (slurmd before slurmctld before munged), then remove the directory."""
        for pid in reversed(self.pids):
            try:
                os.killpg(pid, 15)  # each daemon leads its own session (start_new_session)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 15
        for pid in reversed(self.pids):
            if not poll(partial(exited, pid), max(0.0, deadline - time.monotonic()), interval=0.1):
                try:
                    os.killpg(pid, 9)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
        shutil.rmtree(self.base, ignore_errors=True)


def exited(pid: int) -> bool:
    """Whether child `pid` has exited (reaped now if so)."""
    try:
        return bool(os.waitpid(pid, os.WNOHANG)[0])
    except ChildProcessError:  # reaped already
        return True
