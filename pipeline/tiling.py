"""Cutting HR tiles, filtering them, and assigning each to a split by its source group.

Tiles are non-overlapping squares on a grid anchored at the top-left corner; the right and bottom remainders
that do not fill a whole tile are left out. A tile is dropped as near-uniform when the standard deviation of
its luminance (0.299 R + 0.587 G + 0.114 B, or the mean of the bands when they are not named red, green and
blue; in 0..255 units of the dataset's radiometry) over its valid pixels is below `min_tile_std`: open ocean,
cloud decks and fill carry no structure to learn from. Tiles with more than `max_nodata_share` nodata are
dropped before that.

Splits are assigned per *group*, never per tile, from a hash of the group id and `split_seed`, so the
assignment is deterministic and a group keeps its split when other data is added. A group is a source image
(optionally merged by `group_regex`, e.g. several acquisitions of one place), or, for one large mosaic, a
square block of `block_tiles` x `block_tiles` tiles. With blocks, `guard` also drops every tile that touches
(8-neighbourhood) a kept tile of a more held-out split (test over val over train), so no two kept tiles of
different splits share an edge or a corner.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

SPLIT_PRIORITY = {"train": 0, "val": 1, "test": 2}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def content_hash(pixels: np.ndarray) -> str:
    """SHA-256 of an image array's shape and pixel bytes: equal hashes mean identical pixels."""
    digest = hashlib.sha256(f"{pixels.shape}|{pixels.dtype}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class GridRow:
    """One row of tiles: tile c covers pixels [row*T, (row+1)*T) x [c*T, (c+1)*T)."""

    row: int
    tiles: np.ndarray  # (n_cols, T, T, C) stored values
    valid: np.ndarray  # (n_cols, T, T) bool: not nodata
    std: np.ndarray  # (n_cols,) luminance standard deviation of each tile's valid pixels (0-255 units)
    nodata_share: np.ndarray  # (n_cols,) share of each tile's pixels that are nodata


def grid_shape(height: int, width: int, tile_size: int) -> tuple[int, int]:
    """Number of whole tiles (rows, cols) that fit in an image."""
    return height // tile_size, width // tile_size


def luma_weights(bands: tuple[str, ...]) -> np.ndarray:
    """Per-band weights of the luminance the near-uniform filter measures: Rec. 601 on the bands named red, green
    and blue when all three are there, else the plain mean of the bands."""
    weights = np.zeros(len(bands), dtype=np.float32)
    if {"red", "green", "blue"} <= set(bands):
        for name, weight in zip(("red", "green", "blue"), _LUMA, strict=True):
            weights[bands.index(name)] = weight
    else:
        weights[:] = 1.0 / len(bands)
    return weights


def cut_row(row: int, values: np.ndarray, valid: np.ndarray, tile_size: int, n_cols: int,
            units: Callable[[np.ndarray], np.ndarray], weights: np.ndarray) -> GridRow:
    """Cut the (C, T, W) stored values and (T, W) valid mask of one grid row into its `n_cols` tiles.
    `units` maps (n, T, T, C) stored values to float32 0-255 units (the radiometry times 255)."""
    channels = values.shape[0]
    band = values[:, :, : n_cols * tile_size]
    tiles = np.ascontiguousarray(band.reshape(channels, tile_size, n_cols, tile_size).transpose(2, 1, 3, 0))
    masks = np.ascontiguousarray(valid[:, : n_cols * tile_size].reshape(tile_size, n_cols, tile_size)
                                 .transpose(1, 0, 2))
    luma = units(tiles) @ weights  # (n, T, T)
    std = luma.reshape(n_cols, -1).std(axis=1)
    share = 1.0 - masks.reshape(n_cols, -1).mean(axis=1)
    for col in np.flatnonzero(share > 0).tolist():  # statistics of valid pixels only
        std[col] = luma[col][masks[col]].std() if share[col] < 1 else 0.0
    return GridRow(row, tiles, masks, std, share)


def group_id(source_key: str, row: int, col: int, *, group_by: str, block_tiles: int,
             group_regex: str | None) -> str:
    """The split group of the tile at grid position (row, col) of `source_key`."""
    base = source_key
    if group_regex is not None:
        match = re.search(group_regex, source_key)
        if match:
            base = match.group(1) if match.groups() else match.group(0)
    if group_by == "block":
        return f"{base}#block-{row // block_tiles}-{col // block_tiles}"
    return base


def _uniform(group: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(group: str, ratios: Mapping[str, float], seed: int) -> str:
    """Deterministic split for a group: a uniform number from SHA-256(seed:group) cut by the ratios."""
    u = _uniform(group, seed)
    cumulative = 0.0
    for split in ("train", "val"):
        cumulative += ratios[split]
        if u < cumulative:
            return split
    return "test" if ratios["test"] > 0 else ("val" if ratios["val"] > 0 else "train")


class SplitAssigner:
    """The split of each group. By hash thresholds (`assign_split`), so a group keeps its split when data is added;
    but when the groups are known up front (one per image, or per `group_regex` match) and the thresholds leave a
    split that has a share without any group, by rank of the same hash values instead: the lowest to train, then
    val, then test, each split with a share getting max(1, round(share x groups)) (train the rest), which a small
    folder needs. With fewer groups than splits that have a share, nothing can fill them: hash thresholds, and the
    ETL reports the empty split."""

    def __init__(self, ratios: Mapping[str, float], seed: int, groups: list[str] | None = None) -> None:
        self.ratios, self.seed = dict(ratios), seed
        self.method, self.fixed = "hash", {}
        if not groups:
            return
        groups = sorted(set(groups))
        wanted = [s for s in SPLIT_PRIORITY if self.ratios[s] > 0]
        if {assign_split(g, self.ratios, seed) for g in groups} >= set(wanted):
            return
        if len(groups) < len(wanted):
            return
        held_out = {s: max(1, round(self.ratios[s] * len(groups))) for s in wanted if s != "train"}
        while len(groups) - sum(held_out.values()) < 1:  # train keeps at least one group
            largest = max(held_out, key=lambda s: (held_out[s], SPLIT_PRIORITY[s]))
            held_out[largest] -= 1
        order = sorted(groups, key=lambda g: (_uniform(g, seed), g))
        counts = {"train": len(groups) - sum(held_out.values()), **held_out}
        position = 0
        for split in SPLIT_PRIORITY:
            for group in order[position : position + counts.get(split, 0)]:
                self.fixed[group] = split
            position += counts.get(split, 0)
        self.method = "ranked"

    def __call__(self, group: str) -> str:
        return self.fixed.get(group) or assign_split(group, self.ratios, self.seed)


def guard_band(splits: Mapping[tuple[int, int], str]) -> set[tuple[int, int]]:
    """Grid positions to drop so no kept tile touches a kept tile of a more held-out split.

    `splits` maps (row, col) of the kept tiles of one image to their split. The decision is made on the
    input set as a whole, so it does not depend on visiting order.
    """
    dropped = set()
    for (row, col), split in splits.items():
        mine = SPLIT_PRIORITY[split]
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                other = splits.get((row + dr, col + dc))
                if other is not None and SPLIT_PRIORITY[other] > mine:
                    dropped.add((row, col))
    return dropped
