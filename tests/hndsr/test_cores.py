"""Each of several torch processes on one machine gets its share of the cores this process may use."""

import os

from hndsr import cores


def test_shares_divide_the_available_cores_and_never_fall_to_zero(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6})  # 7 cores allowed
    assert cores.available() == 7
    assert [cores.share(n) for n in (0, 1, 2, 3, 7, 8, 100)] == [7, 7, 3, 2, 1, 1, 1]
    assert cores.share_env(2) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "3"}


def test_the_share_follows_this_process_affinity_not_the_machine():
    assert cores.available() == len(os.sched_getaffinity(0)) <= (os.cpu_count() or 1)
