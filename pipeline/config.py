"""The `etl` section of params.yaml as a typed, validated config."""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hndsr.config import ConfigError
from hndsr.degradation import is_exact
from hndsr.params import load_section

SPLITS = ("train", "val", "test")
GROUP_BY = ("auto", "image", "block")
RADIOMETRY_METHODS = ("fixed", "percentile")
RADIOMETRY_KINDS = ("16bit", "float")  # 8-bit is always 0..255, as PNG and JPEG are


@dataclass(frozen=True)
class SplitRatios:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1


@dataclass(frozen=True)
class RadiometryParams:
    """How 16-bit and float rasters map to the model's [0, 1] (hndsr.raster.DataSpec): `fixed` divides by
    `scale` (low 0); `percentile` maps each band's `percentiles` (low, high) on the training split to 0 and 1."""

    method: str = "fixed"
    scale: dict[str, float] = field(default_factory=lambda: {"16bit": 65535.0, "float": 1.0})
    percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])

    def validate(self) -> None:
        if self.method not in RADIOMETRY_METHODS:
            raise ConfigError(f"etl.radiometry.method: must be one of {', '.join(RADIOMETRY_METHODS)}, "
                              f"got {self.method!r}")
        for kind, value in self.scale.items():
            if kind not in RADIOMETRY_KINDS:
                raise ConfigError(f"etl.radiometry.scale.{kind}: unknown kind (known: {', '.join(RADIOMETRY_KINDS)}; "
                                  "8-bit is always 0..255)")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"etl.radiometry.scale.{kind}: must be a positive number, got {value}")
        if len(self.percentiles) != 2 or not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
            raise ConfigError(f"etl.radiometry.percentiles: must be [low, high] with 0 <= low < high <= 100, "
                              f"got {self.percentiles}")


@dataclass(frozen=True)
class EtlParams:
    """What the ETL stage reads, how it tiles, and how it assigns splits (see params.yaml for each key)."""

    source: str | list[str] = "bluemarble"  # one source, or a list of them (keys then prefixed by each's name)
    lr_source: str | None = None
    tile_size: int = 120
    scales: list[float] = field(default_factory=lambda: [2.0, 2.5, 3.0, 4.0])
    min_tile_std: float = 6.0
    group_by: str = "auto"
    block_tiles: int = 4  # with group_by block: a block is block_tiles x block_tiles tiles
    group_regex: str | None = None
    guard: bool = True
    splits: SplitRatios = field(default_factory=SplitRatios)  # shares of groups per split: train, val, test
    split_seed: int = 0
    max_image_pixels: int = 150_000_000
    bands: list[int] | None = None
    band_names: list[str] | None = None
    source_bands: dict[str, list[int]] = field(default_factory=dict)
    max_nodata_share: float = 0.0
    radiometry: RadiometryParams = field(default_factory=RadiometryParams)

    def __post_init__(self) -> None:
        if not self.sources or any(not s.strip() for s in self.sources):
            raise ConfigError("etl.source: must name a source (bluemarble, a folder, or s3://bucket/prefix) or a "
                              "list of them")
        if self.lr_source is not None and self.sources != [self.source]:
            raise ConfigError("etl.lr_source: paired LR images need a single etl.source, not a list")
        if self.lr_source is not None and self.source == "bluemarble":
            raise ConfigError("etl.lr_source: only a folder or s3:// source can have paired LR images")
        if self.tile_size < 8:
            raise ConfigError(f"etl.tile_size: must be at least 8 pixels, got {self.tile_size}")
        if not self.scales:
            raise ConfigError("etl.scales: list at least one scale, e.g. [2, 2.5, 3, 4]")
        if len(set(self.scales)) != len(self.scales):
            raise ConfigError(f"etl.scales: contains duplicates: {self.scales}")
        for i, scale in enumerate(self.scales):
            if not math.isfinite(scale) or scale <= 1.0:
                raise ConfigError(f"etl.scales[{i}]: every scale must be greater than 1, got {scale}")
            if not is_exact(self.tile_size, scale):
                raise ConfigError(
                    f"etl.scales[{i}]: tile_size {self.tile_size} / scale {scale} is not a whole number, so "
                    f"LR tiles would not map back to {self.tile_size} px; pick a tile_size that every scale "
                    "divides (120 or 240 work for 2, 2.5, 3 and 4)"
                )
        if self.min_tile_std < 0:
            raise ConfigError(f"etl.min_tile_std: must be >= 0, got {self.min_tile_std}")
        if self.group_by not in GROUP_BY:
            raise ConfigError(f"etl.group_by: must be one of {', '.join(GROUP_BY)}, got {self.group_by!r}")
        if self.block_tiles < 1:
            raise ConfigError(f"etl.block_tiles: must be at least 1, got {self.block_tiles}")
        if self.group_regex is not None:
            try:
                re.compile(self.group_regex)
            except re.error as exc:
                raise ConfigError(f"etl.group_regex: not a valid regular expression ({exc})") from None
        ratios = asdict(self.splits)
        for name, ratio in ratios.items():
            if not 0.0 <= ratio <= 1.0:
                raise ConfigError(f"etl.splits.{name}: must be between 0 and 1, got {ratio}")
        if abs(sum(ratios.values()) - 1.0) > 1e-6:
            raise ConfigError(
                f"etl.splits: train + val + test must sum to 1, got {sum(ratios.values()):.6g} ({ratios})"
            )
        if self.splits.train <= 0.0:
            raise ConfigError("etl.splits.train: must be greater than 0")
        if self.max_image_pixels < self.tile_size * self.tile_size:
            raise ConfigError(f"etl.max_image_pixels: must allow at least one tile, got {self.max_image_pixels}")
        if self.bands is not None and (not self.bands or any(b < 1 for b in self.bands)):
            raise ConfigError(f"etl.bands: list 1-based band indexes (e.g. [1, 2, 3, 4]) or null, got {self.bands}")
        for pattern, indexes in self.source_bands.items():
            if len(indexes) != self.channels or any(b < 1 for b in indexes):
                raise ConfigError(f"etl.source_bands.{pattern}: must list {self.channels} 1-based band indexes "
                                  f"(as many as etl.bands), got {indexes}")
        if self.band_names is not None:
            if len(self.band_names) != self.channels:
                raise ConfigError(f"etl.band_names: {len(self.band_names)} names for {self.channels} bands")
            if len(set(self.band_names)) != len(self.band_names) or not all(n.strip() for n in self.band_names):
                raise ConfigError(f"etl.band_names: names must be distinct and non-empty, got {self.band_names}")
        if not 0.0 <= self.max_nodata_share < 1.0:
            raise ConfigError(f"etl.max_nodata_share: must be in [0, 1), got {self.max_nodata_share}")
        self.radiometry.validate()

    @property
    def channels(self) -> int:
        """Bands per tile: len(bands), or 3 (RGB)."""
        return 3 if self.bands is None else len(self.bands)

    @property
    def names(self) -> tuple[str, ...]:
        """The band names recorded with the data: `band_names`, else red, green, blue for RGB, else band<index>."""
        if self.band_names is not None:
            return tuple(self.band_names)
        if self.bands is None:
            return ("red", "green", "blue")
        return tuple(f"band{b}" for b in self.bands)

    def bands_of(self, key: str) -> list[int] | None:
        """The 1-based bands read from the raster source `key`: the first `source_bands` glob that matches it,
        else `bands`; None when neither says (then 1, 2, 3, or a one-band raster's band three times)."""
        for pattern, indexes in self.source_bands.items():
            if fnmatch.fnmatchcase(key, pattern):
                return list(indexes)
        return list(self.bands) if self.bands is not None else None

    @property
    def sources(self) -> list[str]:
        """`source` as a list: one entry, or every source of a list."""
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @property
    def effective_group_by(self) -> str:
        """`auto` means spatial blocks for the Blue Marble mosaic and whole images for everything else."""
        if self.group_by != "auto":
            return self.group_by
        return "block" if self.sources == ["bluemarble"] else "image"

    def to_dict(self) -> dict:
        return asdict(self)


def load_params(path: str | Path) -> EtlParams:
    """Read the `etl` section of a params file; raise ConfigError naming the key on any problem."""
    return load_section(EtlParams, path, "etl")
