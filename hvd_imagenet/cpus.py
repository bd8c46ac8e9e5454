"""How many CPUs a process or a rank may use: what it was given (affinity), not what the machine has."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """The CPUs this process may run on (a SLURM task's --cpus-per-task under CPU binding, taskset, a
    container's cpuset), not every CPU of the machine as os.cpu_count() says."""
    return len(os.sched_getaffinity(0))


def cpus_per_rank(local_size: int) -> int:
    """The CPUs for one rank's threads. A rank given a share of the machine of its own (its affinity at most
    1/local_size of the CPUs: srun --cpus-per-task with binding) uses all of it; ranks that may all run on the
    same CPUs (horovodrun, mpirun --bind-to none) split them, else k ranks each start a thread per CPU."""
    cpus = available_cpus()
    return cpus if cpus * local_size <= (os.cpu_count() or cpus) else max(1, cpus // local_size)
