"""Per-item work (one source image of the ETL, one file of `hndsr predict`) run in this process or as tasks on a
Dask cluster: local worker processes (`workers` N), or the scheduler at `address` (`tcp://host:8786`, started
with `dask scheduler` and joined by `dask worker ADDRESS` on any machines).

Dask rather than Ray: both jobs are plain Python functions over files; Dask's distributed scheduler is a pip
package with no daemon or object store to run, its local cluster is a few processes, and it retries the tasks of
a worker that dies on another one. Results come back in input order, whatever order the tasks finish in, so the
outputs are the same byte for byte as one process. A task that still fails (an error after `retries` retries,
or its worker dying `allowed_failures` + 1 times) is reported as a `Failed` item and the others go on.

The functions and their arguments travel to the workers by pickling (code and settings, never weights): every
worker needs this package installed at the same version and the same paths or object-store URLs readable. On a
cluster at an address, each worker's software (`hndsr.provenance.software`: the project's code hash, Python,
torch, numpy) is checked against this machine's before any task runs, and again by each task (for a worker that
joins later): a worker that differs stops the run with a message that names it.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from tqdm import tqdm

from hndsr import cores, provenance
from hndsr.config import ConfigError

log = logging.getLogger("hndsr.tasks")

ADDRESS_VARIABLE = "HNDSR_DASK_ADDRESS"
T = TypeVar("T")


@dataclass(frozen=True)
class Cluster:
    """Where per-item work runs (params section `cluster`, or the commands' `--workers` / `--cluster`)."""

    address: str | None = None  # a Dask scheduler (tcp://host:8786); null: $HNDSR_DASK_ADDRESS, else local
    workers: int = 0  # without an address: 0 = in this process, N = a local cluster of N worker processes
    retries: int = 1  # a task that raises is tried again this many times (e.g. a transient S3 error)
    allowed_failures: int = 3  # local cluster: a task whose worker dies is moved this many times

    def __post_init__(self) -> None:
        if self.workers < 0 or self.retries < 0 or self.allowed_failures < 0:
            raise ConfigError("cluster.workers, cluster.retries and cluster.allowed_failures: must be 0 or more")

    @property
    def scheduler(self) -> str | None:
        return self.address or os.environ.get(ADDRESS_VARIABLE) or None

    @property
    def distributed(self) -> bool:
        return bool(self.scheduler) or self.workers > 0

    def describe(self) -> str:
        if self.scheduler:
            return f"the Dask cluster at {self.scheduler}"
        return f"a local Dask cluster of {self.workers} worker processes" if self.workers else "this process"


@dataclass(frozen=True)
class Failed:
    """An item whose task failed for good; `error` says why."""

    error: str


def run(fn: Callable[[Any], T], items: Sequence[Any], *, cluster: Cluster, desc: str,
        names: Sequence[str] | None = None) -> Iterator[tuple[int, T | Failed]]:
    """`fn(item)` for every item; yields (index, result or Failed) in input order, with a progress bar."""
    names = list(names) if names is not None else [str(i) for i in range(len(items))]
    if not cluster.distributed:
        for index, item in enumerate(tqdm(items, desc=desc, unit="item", disable=None)):
            try:
                yield index, fn(item)
            except Exception as exc:
                log.exception("%s: %s failed", desc, names[index])
                yield index, Failed(f"{type(exc).__name__}: {exc}")
        return
    yield from _on_dask(fn, items, cluster, desc, names)


def _on_dask(fn, items, cluster: Cluster, desc: str, names: list[str]):
    import dask
    from dask.distributed import Client, LocalCluster, as_completed

    logging.getLogger("distributed").setLevel(logging.WARNING)  # its per-worker start/stop lines; ours say what ran
    # Local workers share this machine's cores: each gets its share for torch and BLAS (Dask's default is one
    # thread, which would make one worker slower than this process).
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **cores.share_env(cluster.workers)}
    with dask.config.set({"distributed.scheduler.allowed-failures": cluster.allowed_failures,
                          "distributed.nanny.pre-spawn-environ": environ}):
        if cluster.scheduler:
            local = None
            client = Client(cluster.scheduler, timeout="30s")
        else:
            local = LocalCluster(n_workers=cluster.workers, threads_per_worker=1, processes=True,
                                 dashboard_address=None, silence_logs=logging.WARNING)
            client = Client(local)
    try:
        if local is None:  # machines of their own: each must run this machine's software
            fn = _same_software_everywhere(client, fn)
        log.info("%s: %d tasks on %s (%d workers)", desc, len(items), cluster.describe(),
                 len(client.scheduler_info()["workers"]))
        run_id = uuid.uuid4().hex[:8]
        keys = [f"{desc}-{run_id}-{i}" for i in range(len(items))]
        futures = client.map(fn, list(items), key=keys, retries=cluster.retries, pure=False)
        index = {key: i for i, key in enumerate(keys)}
        done: dict[int, Any] = {}
        following = 0
        with tqdm(total=len(items), desc=desc, unit="item", disable=None) as bar:
            for future in as_completed(futures):
                i = index[future.key]
                try:
                    done[i] = future.result()
                except provenance.SoftwareMismatch:
                    raise  # a worker that runs other code would give other results: no task of this run counts
                except Exception as exc:  # raised by fn after its retries, or KilledWorker
                    log.error("%s: %s failed on the cluster: %s: %s", desc, names[i], type(exc).__name__, exc)
                    done[i] = Failed(f"task failed on the cluster: {type(exc).__name__}: {exc}")
                future.release()
                bar.update()
                if bar.disable:
                    log.info("%s: %d of %d done (%s)", desc, bar.n, len(items), names[i])
                while following in done:
                    yield following, done.pop(following)
                    following += 1
    finally:
        client.close()
        if local is not None:
            local.close()


def _same_software_everywhere(client, fn: Callable[[Any], T]) -> Callable[[Any], T]:
    """Refuse a cluster any of whose workers runs other software than this machine; `fn` wrapped so that a
    worker joining later refuses its tasks the same way."""
    mine = provenance.software()
    for address, theirs in sorted(client.run(provenance.software).items()):
        provenance.check_same_software(f"the Dask worker {address}", theirs, mine)
    return partial(_checked, fn, mine)


def _checked(fn: Callable[[Any], T], expected: dict[str, str], item: Any) -> T:
    """On a worker: `fn(item)`, once this worker's software is the driver's (`expected`)."""
    import socket

    provenance.check_same_software(f"the Dask worker on {socket.gethostname()}", provenance.software(), expected)
    return fn(item)


def load_cluster(params_path, *, workers: int | None = None, address: str | None = None) -> Cluster:
    """The params' `cluster` section (defaults when the file has none), overridden by command-line options."""
    from dataclasses import replace

    from hndsr.config import from_mapping
    from hndsr.params import load_params

    params = load_params(params_path)
    cluster = from_mapping(Cluster, params.section("cluster"), where="cluster") if "cluster" in params else Cluster()
    if workers is not None:
        cluster = replace(cluster, workers=workers)
    if address is not None:
        cluster = replace(cluster, address=address or None)
    return cluster


def add_arguments(parser) -> None:
    """`--workers` and `--cluster` for the commands that run per-item work here or on a cluster."""
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="run the per-file tasks on a local Dask cluster of N worker processes (0: in this "
                             "process; default: params `cluster.workers`)")
    parser.add_argument("--cluster", default=None, metavar="ADDRESS",
                        help="run them on the Dask scheduler at ADDRESS, e.g. tcp://host:8786 (default: params "
                             f"`cluster.address`, else ${ADDRESS_VARIABLE})")
