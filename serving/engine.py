"""The inference engine: tiles, batching across requests, admission by a pixel budget, deadlines.

A request's LR image is cut into `tile` x `tile` tiles overlapping by `overlap` pixels (smaller images are
one tile). Each tile is super-resolved to its HR size by the size rule and the tiles are blended back with a
smooth (raised-cosine) window over the overlaps, so memory per request is bounded by the tile, not the image.
Tiles of all requests wait in one queue; one worker thread per device takes up to `max_batch` tiles that
share model, scale and DDIM steps and runs them as one batch. Every tile samples with its own seed (derived
from the request's seed and the tile's position), so a result does not depend on what it was batched with:
the same image, scale, steps and seed give the same output, alone or under load.

Admission: a request is accepted while the output pixels of everything queued or running stay within
`max_queue_pixels`; otherwise `Overloaded` (the server answers 503 with Retry-After). Deadlines are checked
before each batch and between DDIM steps; a batch whose requests have all expired is abandoned.
On CUDA a batch runs in half precision (bfloat16 autocast) and an out-of-memory error frees the cache and
retries with half the batch, down to one tile, before the request fails with `Overloaded`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from hndsr.degradation import hr_size
from hndsr.images import to_tensor, to_uint8

log = logging.getLogger("hndsr.serving")


class Overloaded(RuntimeError):
    """No room for the request now (queue full, or out of device memory); retry later."""


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed before its output was ready."""


@dataclass(frozen=True)
class Tile:
    y: int  # LR origin
    x: int
    height: int
    width: int


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Tiles covering an LR image, `tile` px wide, overlapping by at least `overlap`; the last ones flush."""
    def starts(length: int) -> list[int]:
        if length <= tile:
            return [0]
        count = math.ceil((length - overlap) / (tile - overlap))
        step = (length - tile) / (count - 1)
        return [round(i * step) for i in range(count)]

    return [Tile(y, x, min(tile, height), min(tile, width)) for y in starts(height) for x in starts(width)]


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
    lr: np.ndarray  # (h, w, 3) uint8
    scale: float
    steps: int
    seed: int
    deadline: float  # time.monotonic()
    out_height: int
    out_width: int
    tiles: list[Tile]
    future: Future = field(default_factory=Future)
    done: int = 0
    accumulator: np.ndarray | None = None
    weights: np.ndarray | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pixels(self) -> int:
        return self.out_height * self.out_width


@dataclass
class LoadedModel:
    """A model ready to serve, with what /v1/model reports about it."""

    model: object  # hndsr.model.HNDSR
    info: dict
    device: torch.device


class Engine:
    def __init__(self, device: torch.device, *, tile: int = 64, overlap: int = 8, max_batch: int = 8,
                 max_queue_pixels: int = 64_000_000, on_batch: Callable[[int], None] | None = None) -> None:
        if not 2 <= overlap < tile // 2:
            raise ValueError(f"overlap must be in [2, tile/2), got {overlap} with tile {tile}")
        self.device, self.tile, self.overlap, self.max_batch = device, tile, overlap, max_batch
        self.max_queue_pixels = max_queue_pixels
        self._queue: queue.Queue[tuple[Job, int] | None] = queue.Queue()
        self._pending: list[tuple[Job, int]] = []
        self._admitted_pixels = 0
        self._lock = threading.Lock()
        self._on_batch = on_batch
        self._worker = threading.Thread(target=self._run, name=f"hndsr-engine-{device}", daemon=True)
        self._worker.start()

    # -- admission ----------------------------------------------------------------------------------------

    @property
    def queued_pixels(self) -> int:
        return self._admitted_pixels

    @property
    def queued_tiles(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def submit(self, model: LoadedModel, lr: np.ndarray, scale: float, steps: int, seed: int,
               deadline_s: float) -> Job:
        out_h, out_w = hr_size(lr.shape[0], scale), hr_size(lr.shape[1], scale)
        job = Job(model, lr, scale, steps, seed, time.monotonic() + deadline_s, out_h, out_w,
                  plan_tiles(lr.shape[0], lr.shape[1], self.tile, self.overlap))
        with self._lock:
            if self._admitted_pixels + job.pixels > self.max_queue_pixels:
                raise Overloaded(f"the server is busy ({self._admitted_pixels} output pixels queued, budget "
                                 f"{self.max_queue_pixels})")
            self._admitted_pixels += job.pixels
        job.accumulator = np.zeros((out_h, out_w, 3), dtype=np.float32)
        job.weights = np.zeros((out_h, out_w, 1), dtype=np.float32)
        job.future.add_done_callback(lambda _: self._release(job))
        for index in range(len(job.tiles)):
            self._queue.put((job, index))
        return job

    def _release(self, job: Job) -> None:
        with self._lock:
            self._admitted_pixels -= job.pixels

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    # -- the worker ---------------------------------------------------------------------------------------

    def _next_batch(self) -> list[tuple[Job, int]] | None:
        """Up to max_batch tiles sharing (model, scale, steps), oldest first; None to stop."""
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
        first, _ = self._pending[0]
        key = (id(first.model), first.scale, first.steps)
        batch = [p for p in self._pending if (id(p[0].model), p[0].scale, p[0].steps) == key][: self.max_batch]
        taken = {id(p) for p in batch}
        self._pending = [p for p in self._pending if id(p) not in taken]
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for job, index in batch:
                if job.future.done():
                    continue
                if now > job.deadline:
                    job.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
                    continue
                live.append((job, index))
            if live:
                self._run_batch(live)

    def _run_batch(self, batch: list[tuple[Job, int]]) -> None:
        try:
            outputs = self._infer(batch)
        except Exception as exc:  # deadline, out of memory, or a broken model: fail these requests, keep serving
            if not isinstance(exc, DeadlineExceeded | Overloaded):
                log.exception("inference failed")
            for job, _ in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
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
        tiles = [job.tiles[index] for job, index in batch]
        # Tiles of one batch may differ in size (edge tiles of small images): group by size.
        outputs: dict[int, np.ndarray] = {}
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(tiles):
            groups.setdefault((t.height, t.width), []).append(i)
        for members in groups.values():
            lr = np.stack([_crop(batch[i][0].lr, tiles[i]) for i in members])
            seeds = [_tile_seed(batch[i][0].seed, tiles[i]) for i in members]
            jobs = [batch[i][0] for i in members]

            def check_deadline(done: int, total: int, jobs=jobs) -> None:
                if all(time.monotonic() > job.deadline for job in jobs):
                    raise DeadlineExceeded(f"the deadline passed after {done} of {total} DDIM steps")

            x = to_tensor(lr).to(loaded.device)
            use_amp = loaded.device.type == "cuda"
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                hr = loaded.model.super_resolve(x, job0.scale, steps=job0.steps, seed=seeds,
                                                callback=check_deadline)
            for i, pixels in zip(members, to_uint8(hr.float()), strict=True):
                outputs[i] = pixels
        return [outputs[i] for i in range(len(batch))]

    def _blend(self, job: Job, index: int, output: np.ndarray) -> None:
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
        with job.lock:
            assert job.accumulator is not None and job.weights is not None
            job.accumulator[y0 : y0 + height, x0 : x0 + width] += output[:height, :width] * weight
            job.weights[y0 : y0 + height, x0 : x0 + width] += weight
            job.done += 1
            finished = job.done == len(job.tiles)
        if finished and not job.future.done():
            if len(job.tiles) == 1:
                result = output[: job.out_height, : job.out_width]
            else:
                result = np.floor(job.accumulator / job.weights + 0.5).clip(0, 255).astype(np.uint8)
            job.accumulator = job.weights = None
            job.future.set_result(result)


def _crop(image: np.ndarray, tile: Tile) -> np.ndarray:
    return image[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width]


def _tile_seed(seed: int, tile: Tile) -> int:
    digest = hashlib.sha256(f"{seed}:{tile.y}:{tile.x}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
