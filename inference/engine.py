"""The inference engine: tile plans, batching across requests, admission by a pixel budget, deadlines.

Tile plan (`plan_tiles`): the memory budget is `pass_pixels`, the most output pixels one forward pass works on.
A request whose output fits is one tile: the whole image, exactly what the model computes for it. A larger
image gets the fewest tiles the budget allows, and among plans with that many tiles the one that computes the
fewest pixels; tile edges come from the fixed ladder `TILE_EDGES` (an axis that fits in one tile takes the
image's length), so tiles of many images share shapes, batch together and keep compiled graphs static.
Neighbouring tiles overlap by at least `overlap` LR pixels and are blended with a smooth (raised-cosine) window
over the overlaps.

Tiles of all requests wait in one queue; `workers` threads per device each take tiles that share model, scale,
DDIM steps and tile shape, up to `max_batch` of them and `pass_pixels` output pixels, and run them as one
batch; on the CPU two passes in flight fill each other's serial gaps (Fourier transforms, Python between
operators). Every tile samples with its own seed (derived from the request's seed and the tile's position), so a
result does not depend on what it was batched with: the same image, scale, steps and seed give the same output,
alone or under load.

Pixels: a request's image is (h, w, C) float32 model values in [0, 1] (hndsr.raster maps stored values, any
bands and data type, to them and back); the result is (H, W, C) float32 in [0, 1], the model's own output for a
one-tile image and the blend of the tiles otherwise.

Arithmetic: a batch runs in the precision the model was admitted with at load (`LoadedModel.acceleration`,
chosen and checked against float32 by inference/acceleration.py): bfloat16 autocast, or float32.

Admission: a request is accepted while the output pixels of everything queued or running stay within
`max_queue_pixels`; otherwise `Overloaded` (the server answers 503 with Retry-After). Deadlines are checked
before each batch and between DDIM steps; a batch whose requests have all expired, or were all cancelled
(`job.future.cancel()`: the server gave up on them at the end of a shutdown drain), is abandoned.
Background work (`submit(..., background=True)`, the roll-out's shadow runs): not counted in admission, and a
pass of background tiles only stops between DDIM steps when other tiles are waiting (`Preempted`), so it never
holds up requests that clients wait for.
Timing: `Job.submitted`, `Job.started` (its first tile's pass began) and `Job.finished` give queue and
inference time apart.
On CUDA an out-of-memory error frees the cache and retries with half the batch, down to one tile, before the
request fails with `Overloaded`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np
import torch

from hndsr.degradation import hr_size
from hndsr.model import DIHEDRAL, PAD_MULTIPLE
from hndsr.monitoring import Reference
from inference.acceleration import Acceleration

log = logging.getLogger("hndsr.inference")


class Overloaded(RuntimeError):
    """No room for the request now (queue full, or out of device memory); retry later."""


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed before its output was ready."""


class Abandoned(RuntimeError):
    """Every request of a pass was cancelled; the pass stops."""


class Preempted(Abandoned):
    """A pass of background work stopped because other tiles were waiting."""


def _settle(future: Future, *, result=None, error: BaseException | None = None) -> None:
    """Resolve `future` unless it is already done (another worker failed it, or the server cancelled it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


@dataclass(frozen=True)
class Tile:
    y: int  # LR origin
    x: int
    height: int
    width: int


# LR tile edges a tiled image may use (besides an axis's own length): a short geometric ladder (x1.5, x4/3).
TILE_EDGES = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


MAX_PERIOD = 32  # the longest tile-origin lattice used (see lattice_periods)


def lattice_periods(scale: float, longest: int = MAX_PERIOD) -> list[int]:
    """Tile-origin lattices for `scale`, best first: the smallest p <= `longest` with p * scale a whole multiple
    of the model's grid multiple (PAD_MULTIPLE output px: the autoencoder's 2x2 blocks and the UNet's
    downsampling), so a tile computes exactly the image's own grid and block phase; then the smallest with
    p * scale a whole number (the output grid at least lands on whole pixels); then 1."""
    def first(multiple: int) -> int | None:
        return next((p for p in range(1, longest + 1)
                     if abs(p * scale / multiple - round(p * scale / multiple)) < 1e-6), None)

    return list(dict.fromkeys(p for p in (first(PAD_MULTIPLE), first(1), 1) if p is not None))


def tile_count(length: int, edge: int, overlap: int) -> int:
    """How many tiles of `edge` px cover `length` px with neighbours overlapping by at least `overlap`."""
    return 1 if edge >= length else math.ceil((length - overlap) / (edge - overlap))


def tile_shape(height: int, width: int, scale: float, pass_pixels: int, overlap: int) -> tuple[int, int]:
    """The LR tile shape for an image: the whole image if its output fits `pass_pixels`; else the shape from the
    ladder (or an axis's own length) whose output fits and that needs the fewest tiles, then the fewest pixels.
    `overlap` here is the effective one (see plan_tiles). ValueError when not even the smallest tile fits the
    budget at this scale."""
    if hr_size(height, scale) * hr_size(width, scale) <= pass_pixels:
        return height, width

    def edges(length: int) -> list[int]:
        return [e for e in TILE_EDGES if 2 * overlap < e < length] + [length]

    best: tuple[tuple[int, int], tuple[int, int]] | None = None
    for th in edges(height):
        for tw in edges(width):
            if hr_size(th, scale) * hr_size(tw, scale) > pass_pixels:
                continue
            count = tile_count(height, th, overlap) * tile_count(width, tw, overlap)
            key = (count, count * th * tw)
            if best is None or key < best[0]:
                best = key, (th, tw)
    if best is None:
        raise ValueError(f"a pass budget of {pass_pixels} output pixels cannot hold even a "
                         f"{smallest_tile(overlap)} px tile at x{scale:g}")
    return best[1]


def smallest_tile(overlap: int) -> int:
    """The smallest ladder edge usable with `overlap` (a tile must be more than twice the overlap)."""
    return next(e for e in TILE_EDGES if e > 2 * overlap)


def plan_tiles(height: int, width: int, scale: float, pass_pixels: int, overlap: int) -> list[Tile]:
    """Tiles covering an LR image (see the module doc); neighbours overlap by at least `overlap`.

    Tile origins lie on a lattice of p LR pixels (`lattice_periods`), so each tile's output grid is the image's
    own shifted by a multiple of the model's 4 px grid: at x2.5 an origin at an odd LR pixel would put the tile's
    output half a pixel off, and one at 2 px would shift the autoencoder's 2x2 blocks, each of which shows at the
    seams. To keep the overlap after snapping, the shape is chosen with the overlap raised by p - 1; the last
    tile of a row or column starts on the lattice and reaches the far edge, so it can be up to p - 1 px longer
    than the others. When no tile fits the budget with a lattice, the next one is used (at worst, none)."""
    for period in lattice_periods(scale):
        effective = overlap + period - 1
        try:
            tile_h, tile_w = tile_shape(height, width, scale, pass_pixels, effective)
            break
        except ValueError:
            if period == 1:
                raise

    def spans(length: int, edge: int) -> list[tuple[int, int]]:
        count = tile_count(length, edge, effective)
        if count == 1:
            return [(0, length)]
        step = (length - edge) / (count - 1)
        if period == 1:
            starts = [round(i * step) for i in range(count)]
        else:
            starts = [i * (length - edge) // ((count - 1) * period) * period for i in range(count)]  # exact
        return [(start, length - start if i == count - 1 else edge) for i, start in enumerate(starts)]

    return [Tile(y, x, h, w) for y, h in spans(height, tile_h) for x, w in spans(width, tile_w)]


def _window(length: int, ramp: int, at_start: bool, at_end: bool) -> np.ndarray:
    """1-D blending weights: raised-cosine ramps of `ramp` px at inner edges, 1 elsewhere (never 0)."""
    weights = np.ones(length, dtype=np.float32)
    ramp = min(ramp, length // 2)
    if ramp > 0:
        rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp, dtype=np.float32) + 0.5) / ramp)
        if not at_start:
            weights[:ramp] = rise
        if not at_end:
            weights[-ramp:] = rise[::-1]
    return weights


@dataclass
class Job:
    """One request in the engine."""

    model: object  # the LoadedModel captured at admission: a hot swap never mixes versions in one image
    lr: np.ndarray  # (h, w, C) float32 model values (hndsr.raster: stored values mapped to [0, 1])
    scale: float
    steps: int
    seed: int
    deadline: float  # time.monotonic()
    out_height: int
    out_width: int
    tiles: list[Tile]
    future: Future = field(default_factory=Future)
    done: int = 0  # tiles added to the accumulator, in plan order
    arrived: dict = field(default_factory=dict)  # finished tiles waiting for an earlier one (index -> output)
    accumulator: np.ndarray | None = None
    weights: np.ndarray | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    submitted: float = field(default_factory=time.monotonic)
    background: bool = False  # shadow work: not admitted against the budget, preempted by waiting tiles
    started: float | None = None  # when its first tile's pass began
    finished: float | None = None  # when its output was ready

    @property
    def pixels(self) -> int:
        return self.out_height * self.out_width


@dataclass(frozen=True)
class Speed:
    """How long a model takes on this engine, measured at load (`Engine.calibrate`): a pass of `pass_pixels`
    output pixels costs `fixed_s` plus `step_s` per DDIM step (measured with the engine's self-ensemble, if on);
    a request costs its tiles' output pixels in proportion. Used to refuse at once what could not finish before
    its deadline."""

    pass_pixels: int
    fixed_s: float
    step_s: float

    def seconds(self, work_pixels: int, steps: int) -> float:
        return work_pixels / self.pass_pixels * (self.fixed_s + steps * self.step_s)

    def to_dict(self) -> dict:
        per_mp = 1e6 / self.pass_pixels
        return {"s_per_output_megapixel": round(self.fixed_s * per_mp, 4),
                "s_per_output_megapixel_step": round(self.step_s * per_mp, 4)}


@dataclass
class LoadedModel:
    """A model ready to serve, with what /v1/model reports about it."""

    model: object  # hndsr.model.HNDSR
    info: dict
    device: torch.device
    acceleration: Acceleration = field(default_factory=Acceleration)
    speed: Speed | None = None  # set by Engine.calibrate
    reference: Reference | None = None  # the training reference it is monitored against (hndsr.monitoring)


class Engine:
    def __init__(self, device: torch.device, *, pass_pixels: int = 1_000_000, overlap: int = 8, max_batch: int = 1,
                 workers: int = 1, max_queue_pixels: int = 64_000_000, self_ensemble: bool = False,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if not 2 <= overlap < TILE_EDGES[-1] // 2:
            raise ValueError(f"overlap must be in [2, {TILE_EDGES[-1] // 2}), got {overlap}")
        self.device, self.pass_pixels, self.overlap, self.max_batch = device, pass_pixels, overlap, max_batch
        self.max_queue_pixels = max_queue_pixels
        self.ensemble = DIHEDRAL if self_ensemble else None  # every pass averaged over 8 flips/turns: 8x the work
        self._queue: queue.Queue[tuple[Job, int] | None] = queue.Queue()
        self._pending: list[tuple[Job, int]] = []
        self._waiting_foreground = 0  # tiles of client requests submitted and not yet in a pass
        self._admitted_pixels = 0
        self._lock = threading.Lock()
        self._on_batch = on_batch
        self._take = threading.Lock()  # one worker at a time picks its batch
        self._local = threading.local()  # per worker: its sampling copy of the model (see _sampler)
        self.workers = [threading.Thread(target=self._run, name=f"hndsr-engine-{device}-{i}", daemon=True)
                        for i in range(workers)]
        for worker in self.workers:
            worker.start()

    def calibrate(self, loaded: LoadedModel) -> Speed:
        """Time one full-budget pass of `loaded` at its largest scale with 0 and 2 DDIM steps (the best of two
        each, after a warm-up pass), in the arithmetic it serves with; sets and returns `loaded.speed`."""
        model, scale = loaded.model, loaded.model.max_scale
        edge = max(smallest_tile(self.overlap), int(math.sqrt(self.pass_pixels) / scale))
        generator = torch.Generator().manual_seed(0)
        lr = torch.rand(1, model.data.channels, edge, edge, generator=generator).to(loaded.device)

        def timed(steps: int) -> float:
            start = time.perf_counter()
            with torch.inference_mode(), loaded.acceleration.autocast(loaded.device):
                model.super_resolve(lr, scale, steps=steps, seed=[0], ensemble=self.ensemble)
            if loaded.device.type == "cuda":
                torch.cuda.synchronize(loaded.device)
            return time.perf_counter() - start

        timed(0)
        # The best of two of each: one pass delayed by another process (a busy CPU) would otherwise make the fixed
        # cost look larger than the cost with steps, and the step cost 0, so requests with many steps are admitted
        # as if they had none.
        fixed = min(timed(0), timed(0))
        step = max(0.0, (min(timed(2), timed(2)) - fixed) / 2)
        pixels = hr_size(edge, scale) ** 2
        # Per pass of the full budget (a pass's cost grows with its pixels; the probe may be a little smaller).
        loaded.speed = Speed(self.pass_pixels, fixed * self.pass_pixels / pixels, step * self.pass_pixels / pixels)
        figures = loaded.speed.to_dict()
        log.info("speed of version %s on %s: %.3g s per output megapixel + %.3g s per megapixel and DDIM step "
                 "(one pass of %dx%d px at x%g)", loaded.info.get("version"), loaded.device,
                 figures["s_per_output_megapixel"], figures["s_per_output_megapixel_step"], edge, edge, scale)
        return loaded.speed

    def estimate(self, loaded: LoadedModel, height: int, width: int, scale: float, steps: int) -> float | None:
        """Seconds `loaded` would take on an LR image of height x width alone (its tiles' output pixels at the
        measured speed); None before calibration."""
        if loaded.speed is None:
            return None
        tiles = plan_tiles(height, width, scale, self.pass_pixels, self.overlap)
        work = sum(hr_size(t.height, scale) * hr_size(t.width, scale) for t in tiles)
        return loaded.speed.seconds(work, steps)

    def describe(self) -> dict:
        """The engine's limits, as /v1/model shows them."""
        return {"device": str(self.device), "pass_megapixels": self.pass_pixels / 1e6, "max_batch": self.max_batch,
                "workers": len(self.workers), "threads": torch.get_num_threads(),
                "tile_overlap": self.overlap, "tile_edges": list(TILE_EDGES),
                "max_queue_megapixels": self.max_queue_pixels / 1e6, "self_ensemble": self.ensemble is not None}

    # -- admission ----------------------------------------------------------------------------------------

    @property
    def queued_pixels(self) -> int:
        return self._admitted_pixels

    @property
    def queued_tiles(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def reserve(self, pixels: int) -> None:
        """Admit `pixels` output pixels before the request's input is decoded (its decoding then counts against the
        same budget as its inference); Overloaded when they do not fit. `submit(..., reserved=True)` takes the
        reservation over (released when the job ends); `release` returns it if the request ends before."""
        with self._lock:
            if self._admitted_pixels + pixels > self.max_queue_pixels:
                raise Overloaded(f"the server is busy ({self._admitted_pixels} output pixels queued, budget "
                                 f"{self.max_queue_pixels})")
            self._admitted_pixels += pixels

    def release(self, pixels: int) -> None:
        with self._lock:
            self._admitted_pixels -= pixels

    def submit(self, model: LoadedModel, lr: np.ndarray, scale: float, steps: int, seed: int,
               deadline_s: float, *, background: bool = False, reserved: bool = False) -> Job:
        out_h, out_w = hr_size(lr.shape[0], scale), hr_size(lr.shape[1], scale)
        job = Job(model, lr, scale, steps, seed, time.monotonic() + deadline_s, out_h, out_w,
                  plan_tiles(lr.shape[0], lr.shape[1], scale, self.pass_pixels, self.overlap), background=background)
        if not background and not reserved:
            self.reserve(job.pixels)
        with self._lock:
            if not background:
                self._waiting_foreground += len(job.tiles)
        job.accumulator = np.zeros((out_h, out_w, lr.shape[2]), dtype=np.float32)
        job.weights = np.zeros((out_h, out_w, 1), dtype=np.float32)
        # The callback holds the pixel count, not the job: a job -> future -> callback -> job cycle would keep
        # every finished job's input and output alive until the cyclic garbage collector happened to run.
        job.future.add_done_callback(functools.partial(self._release, 0 if background else job.pixels))
        for index in range(len(job.tiles)):
            self._queue.put((job, index))
        return job

    def _release(self, pixels: int, _future: Future) -> None:
        with self._lock:
            self._admitted_pixels -= pixels

    def close(self) -> None:
        for _ in self.workers:
            self._queue.put(None)
        for worker in self.workers:
            worker.join(timeout=10)

    # -- the worker ---------------------------------------------------------------------------------------

    def _next_batch(self) -> list[tuple[Job, int]] | None:
        """Tiles sharing (model, scale, steps, tile shape), oldest first, up to max_batch of them and pass_pixels
        output pixels (always at least one); None to stop."""
        if not self._pending:
            item = self._queue.get()
            if item is None:
                return None
            self._pending.append(item)
        while True:  # take whatever else is waiting, without blocking
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            self._pending.append(item)
        def key(item: tuple[Job, int]) -> tuple:
            job, index = item
            tile = job.tiles[index]
            return id(job.model), job.scale, job.steps, tile.height, tile.width

        first_job, first_index = self._pending[0]
        first_tile = first_job.tiles[first_index]
        tile_pixels = hr_size(first_tile.height, first_job.scale) * hr_size(first_tile.width, first_job.scale)
        size = max(1, min(self.max_batch, self.pass_pixels // tile_pixels))
        wanted = key(self._pending[0])
        batch = [p for p in self._pending if key(p) == wanted][:size]
        taken = {id(p) for p in batch}
        self._pending = [p for p in self._pending if id(p) not in taken]
        return batch

    def _run(self) -> None:
        while True:
            with self._take:
                batch = self._next_batch()
            if batch is None:
                return
            self._serve(batch)
            del batch  # no finished job stays referenced while this worker waits for the next batch

    def _serve(self, batch: list[tuple[Job, int]]) -> None:
        foreground = sum(not job.background for job, _ in batch)
        if foreground:
            with self._lock:
                self._waiting_foreground -= foreground
        now = time.monotonic()
        live = []
        for job, index in batch:
            if job.future.done():
                continue
            if now > job.deadline:
                _settle(job.future, error=DeadlineExceeded("the deadline passed while the request was queued"))
                continue
            if job.started is None:
                job.started = now
            live.append((job, index))
        if live:
            self._run_batch(live)

    def _run_batch(self, batch: list[tuple[Job, int]]) -> None:
        try:
            outputs = self._infer(batch)
        except Exception as exc:  # deadline, out of memory, or a broken model: fail these requests, keep serving
            if not isinstance(exc, DeadlineExceeded | Overloaded | Abandoned):
                log.exception("inference failed")
            for job, _ in batch:
                _settle(job.future, error=exc)
            return
        if self._on_batch is not None:
            self._on_batch(len(batch))
        for (job, index), output in zip(batch, outputs, strict=True):
            self._blend(job, index, output)

    def _infer(self, batch: list[tuple[Job, int]]) -> list[np.ndarray]:
        """Run the batch; on CUDA out-of-memory, retry in halves down to single tiles."""
        try:
            return self._forward(batch)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(batch) == 1:
                raise Overloaded("out of GPU memory even for one tile") from None
            half = len(batch) // 2
            log.warning("CUDA out of memory with %d tiles; retrying in batches of %d", len(batch), half)
            return self._infer(batch[:half]) + self._infer(batch[half:])

    def _forward(self, batch: list[tuple[Job, int]]) -> list[np.ndarray]:
        job0 = batch[0][0]
        loaded: LoadedModel = job0.model  # type: ignore[assignment]
        jobs = [job for job, _ in batch]
        lr = np.stack([_crop(job.lr, job.tiles[index]) for job, index in batch])  # one tile shape per batch
        seeds = [_tile_seed(job.seed, job.tiles[index]) for job, index in batch]

        def check_deadline(done: int, total: int) -> None:
            if all(job.background for job in jobs) and self._waiting_foreground > 0:
                raise Preempted(f"background pass stopped after {done} of {total} DDIM steps: other work waits")
            if all(job.future.done() for job in jobs):
                raise Abandoned(f"every request of this pass was cancelled after {done} of {total} DDIM steps")
            if all(time.monotonic() > job.deadline for job in jobs):
                raise DeadlineExceeded(f"the deadline passed after {done} of {total} DDIM steps")

        x = torch.from_numpy(lr).permute(0, 3, 1, 2).to(loaded.device)
        with torch.inference_mode(), loaded.acceleration.autocast(loaded.device):
            hr = self._sampler(loaded).super_resolve(x, job0.scale, steps=job0.steps, seed=seeds, callback=check_deadline,
                                                     ensemble=self.ensemble)
        return list(hr.float().permute(0, 2, 3, 1).cpu().numpy())

    def _sampler(self, loaded: LoadedModel):
        """This worker's copy of the model for sampling: the networks are shared, the DDIM scheduler (which keeps
        the current timestep plan as state) is the worker's own, so concurrent passes never mix their plans."""
        cached = getattr(self._local, "sampler", None)
        if cached is None or cached[0] is not loaded.model:
            twin = copy.copy(loaded.model)
            twin.scheduler = copy.deepcopy(loaded.model.scheduler)
            self._local.sampler = cached = (loaded.model, twin)
        return cached[1]

    def _blend(self, job: Job, index: int, output: np.ndarray) -> None:
        """Add a finished tile to its job's output. Tiles are added in plan order whatever order they finish in
        (a later one waits in `job.arrived`), so float sums in the overlaps, and thus the result, never depend on
        which worker finished first."""
        with job.lock:
            assert job.accumulator is not None and job.weights is not None
            job.arrived[index] = output
            while job.done in job.arrived:
                self._add(job, job.done, job.arrived.pop(job.done))
                job.done += 1
            finished = job.done == len(job.tiles)
        if finished and not job.future.done():
            if len(job.tiles) == 1:
                result = output[: job.out_height, : job.out_width]
            else:
                result = job.accumulator / job.weights
            job.accumulator = job.weights = None
            job.finished = time.monotonic()
            _settle(job.future, result=result)

    def _add(self, job: Job, index: int, output: np.ndarray) -> None:
        tile, scale = job.tiles[index], job.scale
        at_bottom, at_right = tile.y + tile.height >= job.lr.shape[0], tile.x + tile.width >= job.lr.shape[1]
        # Tiles flush with the far edge are placed flush with the output's edge, so rounding never leaves a gap.
        y0 = job.out_height - output.shape[0] if at_bottom else hr_size(tile.y, scale) if tile.y else 0
        x0 = job.out_width - output.shape[1] if at_right else hr_size(tile.x, scale) if tile.x else 0
        y0, x0 = max(y0, 0), max(x0, 0)
        height = min(output.shape[0], job.out_height - y0)
        width = min(output.shape[1], job.out_width - x0)
        ramp = hr_size(self.overlap, scale)
        wy = _window(output.shape[0], ramp, tile.y == 0, at_bottom)[:height]
        wx = _window(output.shape[1], ramp, tile.x == 0, at_right)[:width]
        weight = (wy[:, None] * wx[None, :])[..., None]
        job.accumulator[y0 : y0 + height, x0 : x0 + width] += output[:height, :width] * weight
        job.weights[y0 : y0 + height, x0 : x0 + width] += weight


def _crop(image: np.ndarray, tile: Tile) -> np.ndarray:
    return image[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width]


def _tile_seed(seed: int, tile: Tile) -> int:
    digest = hashlib.sha256(f"{seed}:{tile.y}:{tile.x}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
