"""The inference engine in-process: tile plans, blending, batching independence, admission."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hndsr.checkpoint import load_model
from hndsr.degradation import hr_size
from hndsr.images import to_tensor, to_uint8
from hndsr.raster import DataSpec
from inference.engine import (
    TILE_EDGES,
    Engine,
    LoadedModel,
    Overloaded,
    Preempted,
    Tile,
    _tile_seed,
    plan_tiles,
    smallest_tile,
)

LIMIT = 4_000_000  # the server's default HNDSR_MAX_INPUT_PIXELS
RGB = DataSpec.fixed()


def submit8(engine: Engine, model: LoadedModel, image: np.ndarray, *args):
    """Submit an 8-bit RGB image (the engine takes model values: hndsr.raster's mapping, as the server does)."""
    return engine.submit(model, RGB.image_to_model(image), *args)


def result8(job, timeout: float) -> np.ndarray:
    """The job's result as 8-bit RGB, as the server encodes it."""
    return RGB.image_from_model(job.future.result(timeout=timeout), "uint8")


@functools.cache
def fewest_tiles(length: int, edge: int, overlap: int) -> int:
    """Written out independently of the engine: the least n with n tiles of `edge` overlapping by `overlap`
    covering `length`."""
    n = 1
    while n * edge - (n - 1) * overlap < length:
        n += 1
    return n


def periods_of(scale: float) -> list[int]:
    """Written out independently: tile-origin lattices, best first: the least p <= 32 with p * scale a multiple
    of 4 (the model's grid), the least with p * scale whole, then 1."""
    def first(multiple: int) -> list[int]:
        return [p for p in range(1, 33) if abs(p * scale / multiple - round(p * scale / multiple)) < 1e-6][:1]

    return list(dict.fromkeys(first(4) + first(1) + [1]))


def check_plan(height: int, width: int, scale: float, budget: int, overlap: int) -> None:
    tiles = plan_tiles(height, width, scale, budget, overlap)
    ys, xs = sorted({t.y for t in tiles}), sorted({t.x for t in tiles})
    assert [(t.y, t.x) for t in tiles] == [(y, x) for y in ys for x in xs]  # a grid
    if hr_size(height, scale) * hr_size(width, scale) <= budget:
        assert tiles == [Tile(0, 0, height, width)]  # fits: the whole image, one tile
        return

    def options_for(effective: int) -> list[tuple[int, int, int]]:
        return [(fewest_tiles(height, eh, effective) * fewest_tiles(width, ew, effective), eh, ew)
                for eh in [e for e in TILE_EDGES if 2 * effective < e < height] + [height]
                for ew in [e for e in TILE_EDGES if 2 * effective < e < width] + [width]
                if hr_size(eh, scale) * hr_size(ew, scale) <= budget]

    # The best lattice whose raised overlap (overlap + p - 1) still lets some tile fit the budget.
    period = next(p for p in periods_of(scale) if options_for(overlap + p - 1) or p == 1)
    assert all(y % period == 0 for y in ys) and all(x % period == 0 for x in xs)
    effective = overlap + period - 1
    heights = {t.y: t.height for t in tiles}
    widths = {t.x: t.width for t in tiles}
    th, tw = heights[ys[0]], widths[xs[0]]
    # One shape, except that the last row and column reach the far edge from a lattice origin.
    assert all(heights[y] == th for y in ys[:-1]) and all(widths[x] == tw for x in xs[:-1])
    assert th <= heights[ys[-1]] < th + period and tw <= widths[xs[-1]] < tw + period
    assert hr_size(th, scale) * hr_size(tw, scale) <= budget or len(tiles) == 1
    assert th in TILE_EDGES or th == height
    assert tw in TILE_EDGES or tw == width
    for starts, edge, last, length in ((ys, th, heights[ys[-1]], height), (xs, tw, widths[xs[-1]], width)):
        assert starts[0] == 0 and starts[-1] + last == length  # flush with both edges, nothing outside
        assert all(b - a <= edge - overlap for a, b in zip(starts, starts[1:], strict=False))  # covered, overlapped
    # No tile more than needed: no allowed shape within the budget covers the image with fewer tiles, and no
    # plan with as few tiles computes fewer pixels (counted with the raised overlap).
    options = options_for(effective)
    least = min(n for n, _, _ in options)
    assert len(tiles) == least
    assert len(tiles) * th * tw == min(n * eh * ew for n, eh, ew in options if n == least)


@pytest.mark.parametrize("scale", [2.0, 2.5, 3.3, 4.0])
def test_tile_plan_for_every_square_size_up_to_the_limit(scale):
    for edge in range(1, int(LIMIT**0.5) + 1):
        check_plan(edge, edge, scale, 1_000_000, 8)


@settings(max_examples=400, deadline=None)
@given(st.integers(1, LIMIT), st.floats(0.0, 1.0), st.floats(2.0, 4.0), st.floats(0.02, 20.0), st.integers(2, 16))
def test_tile_plan_properties(height, aspect, scale, megapixels, overlap):
    width = max(1, min(LIMIT // height, round((LIMIT // height) ** aspect)))  # any shape within the limit
    budget = max(int(megapixels * 1e6), hr_size(smallest_tile(overlap), scale) ** 2)
    check_plan(height, width, scale, budget, overlap)
    check_plan(width, height, scale, budget, overlap)


def test_tile_plan_is_refused_when_no_tile_fits():
    with pytest.raises(ValueError, match="cannot hold even a 32 px tile"):
        plan_tiles(500, 500, 4.0, 100, 8)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from tests.serving.test_server import write_model

    folder = write_model(tmp_path_factory.mktemp("engine") / "models", seed=0, local=True)
    return LoadedModel(load_model(folder), {"version": "t"}, torch.device("cpu"))


def test_tiled_output_matches_the_whole_image(loaded):
    yy, xx = np.mgrid[0:100, 0:90]
    smooth = np.stack([127 + 100 * np.sin(xx / 7 + c) * np.cos(yy / 9) for c in range(3)], axis=-1).astype(np.uint8)
    engine = Engine(torch.device("cpu"), pass_pixels=20_000, overlap=6)
    try:
        # Tiles see replicated borders where the whole image has neighbours, and at a non-integer scale a tile's
        # output grid can sit half a pixel off the whole image's; the blended overlaps hide both. (The default
        # model in models/: see the last table of benchmarks/tile_budget.py.)
        for scale, mean_limit in ((3.0, 0.3), (2.5, 1.5)):
            job = submit8(engine, loaded, smooth, scale, 0, 0, 60)
            tiled = result8(job, 120)
            assert len(job.tiles) > 1
            assert tiled.shape == (hr_size(100, scale), hr_size(90, scale), 3)
            whole = to_uint8(loaded.model.super_resolve(to_tensor(smooth), scale, steps=0))[0]
            difference = np.abs(tiled.astype(int) - whole.astype(int))
            assert difference.mean() < mean_limit and difference.max() <= 8, (scale, difference.mean())
    finally:
        engine.close()


def test_a_result_ignores_its_batch_company(loaded):
    rng = np.random.default_rng(0)
    small = [rng.integers(0, 256, (30, 30, 3), dtype=np.uint8) for _ in range(2)]
    batches = []
    engine = Engine(torch.device("cpu"), pass_pixels=4 * hr_size(30, 3) ** 2, max_batch=4, on_batch=batches.append)
    try:
        alone = result8(submit8(engine, loaded, small[1], 3.0, 2, 5, 60), 120)
        blocker = submit8(engine, loaded, rng.integers(0, 256, (60, 60, 3), dtype=np.uint8), 3.0, 8, 1, 60)
        jobs = [submit8(engine, loaded, small[0], 3.0, 2, 9, 60), submit8(engine, loaded, small[1], 3.0, 2, 5, 60)]
        np.testing.assert_array_equal(result8(jobs[1], 120), alone)
        result8(blocker, 120)
        assert 2 in batches  # the two small requests did share a pass
    finally:
        engine.close()


def test_concurrent_workers_give_the_sequential_results(loaded):
    """Two passes in flight on one model, with different DDIM step counts: each request gets exactly what one
    worker alone gives it (the scheduler's timestep plan is per worker)."""
    rng = np.random.default_rng(3)
    requests = [(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8), 3.0 if i % 2 else 4.0, 1 + i % 3, i)
                for i in range(8)]
    results = {}
    for workers in (1, 2):
        engine = Engine(torch.device("cpu"), pass_pixels=200_000, workers=workers)
        try:
            jobs = [submit8(engine, loaded, image, scale, steps, seed, 120) for image, scale, steps, seed in requests]
            results[workers] = [result8(job, 120) for job in jobs]
        finally:
            engine.close()
        assert not any(worker.is_alive() for worker in engine.workers)
    for alone, together in zip(results[1], results[2], strict=True):
        np.testing.assert_array_equal(alone, together)


def test_a_finished_job_is_freed_as_soon_as_its_caller_lets_go(loaded):
    """No reference cycle keeps a finished job (its input and output arrays) alive until the cyclic garbage
    collector runs: `hndsr predict` on an 8,000 px scene grew to 2.9 GB that way, and is flat without it."""
    import gc
    import time
    import weakref

    engine = Engine(torch.device("cpu"), pass_pixels=20_000, overlap=4, workers=2)
    gc.disable()
    try:
        for size, tiles in ((20, 1), (80, 4)):  # one tile, and several tiles blended
            job = submit8(engine, loaded, np.zeros((size, size, 3), np.uint8), 2.5, 0, 0, 60)
            result8(job, 120)
            assert len(job.tiles) == tiles
            gone = weakref.ref(job)
            del job
            deadline = time.monotonic() + 5  # the worker that finished it may still be returning from its batch
            while gone() is not None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert gone() is None  # freed by reference counting alone: the collector is off
    finally:
        gc.enable()
        engine.close()


def test_admission_refuses_beyond_the_pixel_budget(loaded):
    engine = Engine(torch.device("cpu"), pass_pixels=20_000, overlap=4, max_queue_pixels=hr_size(40, 4) ** 2)
    try:
        first = submit8(engine, loaded, np.zeros((40, 40, 3), np.uint8), 4.0, 30, 0, 60)
        with pytest.raises(Overloaded, match="busy"):
            submit8(engine, loaded, np.zeros((40, 40, 3), np.uint8), 4.0, 30, 0, 60)
        result8(first, 300)
        assert engine.queued_pixels == 0
    finally:
        engine.close()


def test_a_reservation_made_before_decoding_is_taken_over_by_the_job(loaded):
    """The server reserves a request's output pixels from its header, before decoding: a second request that does
    not fit is refused while the first one is still decoding, and the job releases the reservation when it ends."""
    pixels = hr_size(40, 4) ** 2
    engine = Engine(torch.device("cpu"), pass_pixels=20_000, overlap=4, max_queue_pixels=pixels)
    try:
        engine.reserve(pixels)  # the first request, decoding
        with pytest.raises(Overloaded, match="busy"):
            engine.reserve(1)
        with pytest.raises(Overloaded, match="busy"):
            submit8(engine, loaded, np.zeros((8, 8, 3), np.uint8), 2.0, 1, 0, 60)
        job = engine.submit(loaded, RGB.image_to_model(np.zeros((40, 40, 3), np.uint8)), 4.0, 1, 0, 60,
                            reserved=True)
        assert engine.queued_pixels == pixels  # not counted twice
        job.future.result(timeout=300)
        assert engine.queued_pixels == 0
        engine.reserve(pixels)  # a request that failed to decode gives its reservation back
        engine.release(pixels)
        assert engine.queued_pixels == 0
    finally:
        engine.close()


def test_compiled_bfloat16_model_serves_within_the_tolerance(tmp_path):
    """The cheaper modes when their checks pass: bfloat16 (on a CPU with bfloat16 instructions; elsewhere the
    check says why not) and a compiled UNet, then served through the engine at an integer and a non-integer scale,
    within the tolerance of the model's own float32 output."""
    from inference.acceleration import accelerate, bfloat16_supported, psnr
    from tests.serving.test_server import write_model

    folder = write_model(tmp_path / "models", seed=1)
    model = load_model(folder)
    acceleration = accelerate(model, torch.device("cpu"), precision="auto", compile="on", min_psnr_db=45)
    bf16, why_not = bfloat16_supported(torch.device("cpu"))
    compiled = acceleration.checks[-1]
    if "NaN" in compiled.get("detail", ""):  # seen with ATEN_CPU_CAPABILITY=avx2: the check kept it off, rightly
        pytest.skip(f"torch.compile's graph gives NaN on this CPU ({torch.backends.cpu.get_cpu_capability()}); "
                    "the start-up check refused it")
    expected = "bfloat16" if bf16 else "float32"
    assert (acceleration.precision, acceleration.compiled) == (expected, True), acceleration.checks
    assert [c["mode"] for c in acceleration.checks] == ["bfloat16", "compile"]
    checked = acceleration.checks if bf16 else acceleration.checks[1:]
    assert all(c["passed"] and (c["psnr_db"] == "identical" or c["psnr_db"] >= 45) for c in checked)
    if not bf16:
        assert acceleration.checks[0] == {"mode": "bfloat16", "passed": False, "detail": why_not}
    engine = Engine(torch.device("cpu"), pass_pixels=1_000_000)
    image = np.random.default_rng(2).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    try:
        served = LoadedModel(model, {"version": "t"}, torch.device("cpu"), acceleration)
        for scale in (4.0, 2.5):
            got = result8(submit8(engine, served, image, scale, 2, 0, 300), 300)
            seed = _tile_seed(0, Tile(0, 0, 23, 31))
            expected = to_uint8(load_model(folder).super_resolve(to_tensor(image), scale, steps=2, seed=[seed]))[0]
            assert psnr(torch.from_numpy(got) / 255, torch.from_numpy(expected) / 255) >= 45
    finally:
        engine.close()


def test_background_work_is_not_admitted_and_yields_to_client_work(loaded):
    engine = Engine(torch.device("cpu"), pass_pixels=400_000, overlap=4, workers=1,
                    max_queue_pixels=hr_size(40, 4) ** 2)
    try:
        lr = np.random.default_rng(0).random((40, 40, 3), dtype=np.float32)
        shadow = engine.submit(loaded, lr, 4.0, 900, 0, 600, background=True)  # long: many DDIM steps
        assert engine.queued_pixels == 0  # not counted against the budget
        deadline = time.monotonic() + 60
        while shadow.started is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        client = engine.submit(loaded, lr, 4.0, 2, 0, 600)  # admitted although the shadow holds the worker
        output = client.future.result(timeout=120)
        assert output.shape == (160, 160, 3)
        with pytest.raises(Preempted, match="other work waits"):
            shadow.future.result(timeout=1)
        assert client.started - client.submitted < 30  # it waited one DDIM step, not 900
    finally:
        engine.close()


def test_self_ensemble_averages_the_eight_orientations_of_each_pass(loaded):
    """HNDSR_SELF_ENSEMBLE (`hndsr predict --self-ensemble`): the engine's pass is the model's self-ensemble."""
    from hndsr.model import DIHEDRAL

    image = np.random.default_rng(3).integers(0, 256, (24, 30, 3), dtype=np.uint8)
    plain, ensemble = Engine(torch.device("cpu")), Engine(torch.device("cpu"), self_ensemble=True)
    try:
        assert ensemble.describe()["self_ensemble"] and not plain.describe()["self_ensemble"]
        job = ensemble.submit(loaded, RGB.image_to_model(image), 2.5, 2, 7, 60)
        out = job.future.result(timeout=120)
        x = torch.from_numpy(RGB.image_to_model(image)).permute(2, 0, 1)[None]
        expected = loaded.model.super_resolve(x, 2.5, steps=2, seed=[_tile_seed(7, job.tiles[0])], ensemble=DIHEDRAL)
        np.testing.assert_allclose(out, expected[0].permute(1, 2, 0).numpy(), atol=1e-6)
        other = plain.submit(loaded, RGB.image_to_model(image), 2.5, 2, 7, 60).future.result(timeout=120)
        assert np.abs(other - out).max() > 1e-3  # the ensemble is not the plain pass
    finally:
        plain.close()
        ensemble.close()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_same_thread_count_repeats_exactly_and_another_differs_by_one_level_at_most(tmp_path, precision):
    """README "Determinism": oneDNN splits a convolution's sums by the threads it has, so the output is a function
    of the input, model, seed, machine type and the torch thread count. With another thread count, stored 8- and
    16-bit values differ by at most one level, in a small share of the values."""
    from inference.acceleration import Acceleration, _layout, bfloat16_supported
    from tests.serving.test_server import write_model

    if precision == "bfloat16" and not bfloat16_supported(torch.device("cpu"))[0]:
        pytest.skip("this CPU has no bfloat16 instructions: the server runs float32 here (the other case)")
    model = load_model(write_model(tmp_path, seed=0))
    if precision == "bfloat16":
        _layout(model, torch.channels_last)
    loaded = LoadedModel(model, {"version": "t"}, torch.device("cpu"), Acceleration(precision))
    image = RGB.image_to_model(np.random.default_rng(5).integers(0, 256, (150, 170, 3), dtype=np.uint8))
    before = torch.get_num_threads()
    outputs = {}
    try:
        for run, threads in (("one", 1), ("one again", 1), ("two", 2)):
            torch.set_num_threads(threads)  # the engine's worker threads, started after this, take it
            engine = Engine(torch.device("cpu"), pass_pixels=60_000, workers=2)  # several tiles, 2 in flight
            try:
                job = engine.submit(loaded, image, 2.5, 2, 3, 300)
                outputs[run] = job.future.result(timeout=300)
                assert len(job.tiles) > 1
            finally:
                engine.close()
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(outputs["one"], outputs["one again"])
    total = outputs["one"].size
    for dtype, share in (("uint8", 1e-3), ("uint16", 1e-2)):
        one, two = (RGB.image_from_model(outputs[run], dtype).astype(np.int64) for run in ("one", "two"))
        differ = int((one != two).sum())
        assert np.abs(one - two).max() <= 1 and differ <= share * total, (dtype, differ, total)


def test_a_mode_whose_output_holds_nan_fails_its_check_with_a_json_record():
    """A cheaper mode that returns NaN (seen: a compiled UNet with ATEN_CPU_CAPABILITY=avx2) is refused with a
    record that /v1/model can serve (JSON has no NaN), not reported as "identical"."""
    import json

    from inference.acceleration import verdict

    reference = [torch.rand(1, 3, 8, 8)]
    broken = [reference[0].clone()]
    broken[0][0, 0, 0, 0] = float("nan")
    record = verdict("compile", broken, reference, 45.0)
    assert record == {"mode": "compile", "passed": False, "tolerance_db": 45.0,
                      "detail": "its output on the reference input holds NaN or infinity"}
    json.dumps(record, allow_nan=False)
    assert verdict("compile", reference, reference, 45.0)["psnr_db"] == "identical"
    close = verdict("bfloat16", [reference[0] + 1e-3], reference, 45.0)
    assert close["passed"] and 59 < close["psnr_db"] < 61 and close["max_abs_diff_255"] == 0.26
