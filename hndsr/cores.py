"""CPU threads per process, so torch processes that run side by side on one machine share its cores.

torch (and the BLAS and OpenMP under it) starts one compute thread per core in every process. Two such processes
on the same cores make 2x the threads the machine has; they spin waiting for each other and each runs several
times slower (measured on 2 cores: three training processes of two threads each ran at 11 samples/s instead of
about 100). Whatever starts several torch processes on one machine (local Dask workers, torchrun, the tests) gives
each `share(n)` threads through the environment that the OpenMP, MKL and OpenBLAS runtimes read at start.

The thread count is also part of what makes a result repeat: oneDNN splits a convolution's work by the threads it
has, so float sums round differently with another count (docs/explanation/reproducibility.md).
"""

from __future__ import annotations

import os

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def share(processes: int) -> int:
    """Threads for each of `processes` torch processes that run side by side here (at least 1)."""
    return max(1, available() // max(1, processes))


def share_env(processes: int) -> dict[str, str]:
    """The environment variables that give a child process its `share(processes)` threads."""
    threads = str(share(processes))
    return dict.fromkeys(THREAD_VARIABLES, threads)
