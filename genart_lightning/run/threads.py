"""How many intra-op threads a CPU run gives torch: the cores it may use, less what its loader workers need.

torch defaults to one OpenMP thread per core and ignores the loader workers beside it. On a shared machine the
surplus threads spin-wait for each other: a 16px U-Net step measured 0.20 s at 1 thread and 2.8-5.0 s at 2 next
to one busy process on 2 cores (PITFALLS.md). Loader workers themselves run one thread each (torch sets that).
The rule is where a run starts; `genart fit` then tunes the count on its own steps (callbacks/thread_tuner.py)
unless the user fixed it.
"""

from __future__ import annotations

import os
from typing import NamedTuple


class ThreadChoice(NamedTuple):
    """The threads chosen, why, and the cores they were chosen from (None when the user fixed the count)."""

    threads: int
    why: str
    cores: int | None = None

    def line(self) -> str:
        return f"CPU threads: {self.threads} for torch ({self.why})"

    def tuning_candidates(self) -> list[int]:
        """Counts worth trying on this share of cores: powers of two up to it, and the share itself."""
        if self.cores is None:
            return []
        return sorted({2**i for i in range(self.cores.bit_length()) if 2**i <= self.cores} | {self.cores, self.threads})


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (what taskset, cgroups and SLURM's binding allow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose_threads(loader_workers: int, processes: int = 1, requested: int | None = None) -> ThreadChoice:
    """`requested` (--threads), else OMP_NUM_THREADS, else the cores of this process's share
    (SLURM_CPUS_PER_TASK in a SLURM job, the affinity otherwise, split over `processes` on the node) less its
    loader workers, at least 1."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads {requested} is out of range; use 1 or more")
        return ThreadChoice(requested, "--threads")
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return ThreadChoice(max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS")
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit():
        cores, source = int(slurm), "SLURM_CPUS_PER_TASK"
    else:
        cores = max(1, usable_cores() // max(1, processes))
        source = "usable cores" + (f" / {processes} processes" if processes > 1 else "")
    threads = max(1, cores - loader_workers)
    return ThreadChoice(threads, f"{cores} {source} - {loader_workers} loader worker{'s' if loader_workers != 1 else ''}", cores)


def set_cpu_threads(loader_workers: int, processes: int = 1, requested: int | None = None) -> ThreadChoice:
    """Set torch's intra-op threads for a CPU run (before its first op); the choice, to print and to tune from."""
    import torch

    choice = choose_threads(loader_workers, processes, requested)
    torch.set_num_threads(choice.threads)
    return choice
