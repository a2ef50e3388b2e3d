"""The test harness itself: a hang fails at its timeout, and a failing comparison of large outputs fails in
seconds with a short message (pytest's own explanation of `a == b` on large byte strings takes minutes)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import rasterio

from tests.compare import assert_close_rasters, assert_same_bytes

SIZE = 35_000_000  # bytes: the size of a scene output whose comparison once ran for more than ten minutes


def test_the_suite_has_a_per_test_timeout(pytestconfig):
    assert 0 < float(pytestconfig.getini("timeout")) <= 600


def test_a_hanging_test_fails_at_its_timeout(pytester):
    pytester.makepyfile(test_hangs="""
        import time

        def test_hangs():
            time.sleep(600)
    """)
    start = time.monotonic()
    result = pytester.runpytest_subprocess("--timeout", "3")
    elapsed = time.monotonic() - start
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Timeout (>3.0s)*"])
    assert elapsed < 60, f"the hanging test took {elapsed:.0f} s to fail"


def _files(folder, changes: int):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, SIZE, dtype=np.uint8)
    a, b = folder / "a.tif", folder / "b.tif"
    a.write_bytes(data.tobytes())
    data[rng.choice(SIZE, changes, replace=False)] ^= 1
    b.write_bytes(data.tobytes())
    return a, b


def test_a_failing_comparison_of_large_files_fails_in_seconds_with_a_short_message(tmp_path):
    a, b = _files(tmp_path, changes=30)
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failed:
        assert_same_bytes(a, b)
    elapsed = time.monotonic() - start
    message = str(failed.value)
    assert elapsed < 5 and len(message) < 400, (elapsed, len(message))
    assert "first difference at byte" in message and str(SIZE) in message
    assert_same_bytes(a, a)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_a_raster_comparison_counts_the_values_that_differ_and_by_how_much(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.integers(0, 250, (3, 1000, 1200), dtype=np.uint8)
    profile = {"driver": "GTiff", "width": 1200, "height": 1000, "count": 3, "dtype": "uint8"}
    paths = []
    for name, change in (("a", 0), ("b", 1), ("c", 3)):
        changed = values.copy()
        changed[0, :5, :6] += change  # 30 values
        paths.append(tmp_path / f"{name}.tif")
        with rasterio.open(paths[-1], "w", **profile) as dst:
            dst.write(changed)
    a, b, c = paths
    assert assert_close_rasters(a, b, max_levels=1, max_share=1e-4) == (30, 1.0)
    with pytest.raises(pytest.fail.Exception, match=r"30 of 3600000 values differ \(largest difference 3"):
        assert_close_rasters(a, c, max_levels=1, max_share=1e-4)
    with pytest.raises(pytest.fail.Exception, match="30 of 3600000 values differ"):
        assert_close_rasters(a, b)  # identical asked for
