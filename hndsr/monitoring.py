"""Label-free monitoring: the training reference a model carries, and how one request compares with it.

A super-resolution server never sees ground truth, so it watches two things it can compute alone:

- **Consistency**: the answer shrunk back by the degradation function (hndsr.degradation) against the input it
  came from, as PSNR in model units on valid LR pixels (`consistency_psnr_db`; 2 LR pixels at each edge left
  out), and the displacement between the two by phase correlation (`shift_px`, LR pixels; inputs of 16+ px a
  side). A model that invents or loses structure answers less consistently; the figure needs no HR.
- **Input drift**: the input's values in model units against the training split's. Per band, the training
  reference is a histogram over fixed bins (`BINS` bins of 1/BINS over [0, 1], plus one below 0 and one above
  1) of every valid value of the training split's LR tiles at every scale; its training range is the 0.1 and
  99.9 percentiles. A request reports the share of its valid pixels whose every band lies in that range
  (`in_range_share`), its nodata share, and its per-band bin counts, which the server sums over a sliding
  window and compares with the reference by the population stability index (`psi`): on groups of fine bins
  holding about a tenth of the reference each (`PSI_GROUPS`), sum over groups of (a - e) ln(a / e), shares
  smoothed by `PSI_FLOOR`. Usual reading: below 0.1 stable, 0.1-0.25 moderate shift, above 0.25 a large one.

The reference is `reference.json` beside the checkpoints (`models/reference.json`, written by the evaluate stage
from the ETL's input histograms and the validation split's consistency; registered with the version and checked
against its recorded hash at load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hndsr.consistency import phase_shift
from hndsr.degradation import degrade

FORMAT_VERSION = 1
REFERENCE_FILE = "reference.json"  # beside the stage folders of a model
BINS = 64  # fine bins over [0, 1]; two more hold the values below 0 and above 1
PSI_GROUPS = 10  # PSI compares groups of fine bins of about 1/PSI_GROUPS of the reference each
PSI_FLOOR = 1e-4  # shares below this count as this in PSI (an empty bin would make it infinite)
RANGE_PERCENTILES = (0.1, 99.9)  # the training range of a band
CONSISTENCY_EDGES = tuple(float(v) for v in range(10, 81, 2))  # dB, histogram edges of the reference
BORDER = 2  # LR pixels at each edge left out of the consistency (the shrink's kernel reaches past the image)
MAX_PSNR_DB = 99.0  # a perfect match


def bin_index(values: np.ndarray) -> np.ndarray:
    """The fine bin (0 .. BINS + 1) of each model value: 0 below 0, BINS + 1 above 1 (NaN: below)."""
    index = np.floor(np.nan_to_num(values, nan=-1.0) * BINS).astype(np.int64) + 1
    return np.clip(index, 0, BINS + 1)


def band_counts(values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(C, BINS + 2) int64 histogram of (h, w, C) model values on valid pixels."""
    channels = values.shape[-1]
    flat = values.reshape(-1, channels)
    if valid is not None:
        flat = flat[valid.reshape(-1)]
    index = bin_index(flat) + np.arange(channels) * (BINS + 2)
    return np.bincount(index.reshape(-1), minlength=channels * (BINS + 2)).reshape(channels, BINS + 2)


def counts_quantile(counts: np.ndarray, q: float) -> float:
    """The q-th percentile (0-100) of a band's values from its fine histogram (linear within a bin; the outer
    bins read as their edge)."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    cumulative = np.cumsum(counts) / total
    i = int(np.searchsorted(cumulative, q / 100, side="left"))
    i = min(i, len(counts) - 1)
    if i == 0:
        return 0.0
    if i == len(counts) - 1:
        return 1.0
    before = cumulative[i - 1]
    inside = (q / 100 - before) / max(cumulative[i] - before, 1e-12)
    return float((i - 1 + min(max(inside, 0.0), 1.0)) / BINS)


def psi_groups(counts: np.ndarray, groups: int = PSI_GROUPS) -> list[int]:
    """Fine-bin boundaries (a list of group start indexes after the first) cutting a band's reference histogram
    into about `groups` groups of equal mass; bins never split, empty groups merged."""
    total = counts.sum()
    if total == 0:
        return []
    cumulative = np.cumsum(counts) / total
    cuts = []
    for k in range(1, groups):
        cut = int(np.searchsorted(cumulative, k / groups, side="left")) + 1
        if 0 < cut < len(counts) and (not cuts or cut > cuts[-1]):
            cuts.append(cut)
    return cuts


def grouped(counts: np.ndarray, cuts: list[int]) -> np.ndarray:
    return np.add.reduceat(counts, [0, *cuts])


def psi(reference: np.ndarray, observed: np.ndarray) -> float:
    """Population stability index of `observed` counts against `reference` counts (the same groups)."""
    if observed.sum() == 0 or reference.sum() == 0:
        return float("nan")
    expected = np.maximum(reference / reference.sum(), PSI_FLOOR)
    actual = np.maximum(observed / observed.sum(), PSI_FLOOR)
    return float(((actual - expected) * np.log(actual / expected)).sum())


@dataclass(frozen=True)
class BandReference:
    name: str
    counts: np.ndarray  # (BINS + 2,) int64
    low: float  # training range (RANGE_PERCENTILES), model units
    high: float
    cuts: tuple[int, ...]  # PSI groups (psi_groups)

    def psi(self, counts: np.ndarray) -> float:
        return psi(grouped(self.counts, list(self.cuts)), grouped(counts, list(self.cuts)))


@dataclass(frozen=True)
class Reference:
    """A model's training reference (see the module doc); None parts: not recorded."""

    bands: tuple[BandReference, ...]
    consistency: dict | None  # {"psnr_db": {"edges", "counts", "p05", "p50", "p95"}, "shift_px": {...}, ...}
    record: dict  # the JSON it came from

    @classmethod
    def from_record(cls, record: dict) -> Reference:
        if record.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"reference format {record.get('format_version')!r}; this code reads {FORMAT_VERSION}")
        bands = tuple(BandReference(b["name"], np.asarray(b["counts"], dtype=np.int64), float(b["range"][0]),
                                    float(b["range"][1]), tuple(b["psi_cuts"]))
                      for b in record["input"]["bands"])
        if any(len(b.counts) != BINS + 2 for b in bands):
            raise ValueError(f"reference histograms must have {BINS + 2} bins")
        return cls(bands, record.get("consistency"), record)

    def psi(self, counts: np.ndarray) -> list[float]:
        """PSI per band of (C, BINS + 2) counts against the reference."""
        return [band.psi(c) for band, c in zip(self.bands, counts, strict=True)]

    def in_range(self, values: np.ndarray, valid: np.ndarray | None) -> float:
        """Share of the valid pixels of (h, w, C) model values whose every band lies in its training range."""
        low = np.asarray([b.low for b in self.bands], dtype=np.float32)
        high = np.asarray([b.high for b in self.bands], dtype=np.float32)
        inside = ((values >= low) & (values <= high)).all(axis=-1)
        if valid is not None:
            inside = inside[valid]
        return float(inside.mean()) if inside.size else float("nan")

    def summary(self) -> dict:
        """What /v1/model shows: per band its training range and how many values the histogram holds, and the
        consistency quantiles on validation."""
        consistency = self.consistency or {}
        return {
            "input": {"computed_on": self.record["input"].get("computed_on"),
                      "bands": [{"name": b.name, "range": [round(b.low, 4), round(b.high, 4)],
                                 "values": int(b.counts.sum())} for b in self.bands]},
            "consistency_psnr_db": {k: consistency.get("psnr_db", {}).get(k) for k in ("p05", "p50", "p95")}
            if consistency else None,
            "consistency_computed_on": consistency.get("computed_on"),
        }


def input_reference(counts: np.ndarray, names: list[str], computed_on: str) -> dict:
    """The `input` record of a reference from (C, BINS + 2) training counts."""
    bands = []
    for name, c in zip(names, counts, strict=True):
        bands.append({"name": name, "counts": [int(v) for v in c],
                      "range": [round(counts_quantile(c, RANGE_PERCENTILES[0]), 6),
                                round(counts_quantile(c, RANGE_PERCENTILES[1]), 6)],
                      "psi_cuts": psi_groups(c)})
    return {"bins": {"low": 0.0, "high": 1.0, "count": BINS, "outer": "one bin below 0 and one above 1"},
            "range_percentiles": list(RANGE_PERCENTILES), "computed_on": computed_on, "bands": bands}


def distribution(values: list[float], edges: tuple[float, ...]) -> dict:
    """A histogram (values outside the edges in the end bins) and the 5th, 50th and 95th percentiles."""
    array = np.asarray(values, dtype=np.float64)
    counts = np.histogram(np.clip(array, edges[0], edges[-1]), bins=np.asarray(edges))[0] if array.size else []
    q = np.percentile(array, [5, 50, 95]) if array.size else [None] * 3
    return {"edges": list(edges), "counts": [int(v) for v in counts],
            **{k: (round(float(v), 4) if v is not None else None) for k, v in zip(("p05", "p50", "p95"), q,
                                                                                 strict=True)}}


@dataclass(frozen=True)
class Assessment:
    """The figures of one answer (or one window of a scene)."""

    consistency_psnr_db: float | None  # None: no valid pixel inside the border
    shift_px: float | None  # None: the input is under 16 px a side
    in_range_share: float | None  # None: no reference, or no valid pixel
    nodata_share: float
    counts: np.ndarray  # (C, BINS + 2) valid input values by fine bin

    def psi(self, reference: Reference | None) -> float | None:
        """This input's own PSI against the reference (largest over bands)."""
        if reference is None or not self.counts.sum():
            return None
        return max(reference.psi(self.counts))

    def to_dict(self, reference: Reference | None) -> dict:
        def rounded(value, digits):
            return None if value is None or not math.isfinite(value) else round(value, digits)

        return {"consistency_psnr_db": rounded(self.consistency_psnr_db, 3), "shift_px": rounded(self.shift_px, 4),
                "in_range_share": rounded(self.in_range_share, 4), "nodata_share": round(self.nodata_share, 4),
                "psi": rounded(self.psi(reference), 4)}


def consistency(output: np.ndarray | torch.Tensor, lr: np.ndarray, valid: np.ndarray | None,
                scale: float) -> tuple[float | None, float | None]:
    """(PSNR dB, shift in LR px) of the (H, W, C) output in [0, 1] shrunk back against its (h, w, C) model-value
    input on valid pixels (see the module doc)."""
    hr = torch.as_tensor(output).permute(2, 0, 1)[None].float()
    shrunk = degrade(hr, scale)[0].permute(1, 2, 0).numpy()  # (h', w', C)
    h, w = min(shrunk.shape[0], lr.shape[0]), min(shrunk.shape[1], lr.shape[1])
    b = BORDER if min(h, w) > 4 * BORDER else 0
    back, given = shrunk[b : h - b, b : w - b], lr[b : h - b, b : w - b]
    ok = np.ones(back.shape[:2], dtype=bool) if valid is None else valid[b : h - b, b : w - b]
    if not ok.any():
        return None, None
    diff = (back - given)[ok]
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    psnr_db = MAX_PSNR_DB if mse <= 10 ** (-MAX_PSNR_DB / 10) else 10 * math.log10(1.0 / mse)
    shift = None
    if min(back.shape[:2]) >= 16:
        a, g = back.mean(axis=2), given.mean(axis=2)
        dy, dx = phase_shift(np.where(ok, g, g[ok].mean()), np.where(ok, a, a[ok].mean()))
        shift = float(math.hypot(dy, dx))
    return psnr_db, shift


def assess(lr: np.ndarray, valid: np.ndarray | None, output: np.ndarray, scale: float,
           reference: Reference | None) -> Assessment:
    """The figures of one answer: `lr` (h, w, C) model values as the model got them (nodata filled), `valid`
    (h, w) bool or None (all valid), `output` (H, W, C) in [0, 1]."""
    psnr_db, shift = consistency(output, lr, valid, scale)
    pixels = lr.shape[0] * lr.shape[1]
    nodata = 0.0 if valid is None else 1.0 - float(valid.sum()) / max(pixels, 1)
    counts = band_counts(lr, valid)
    in_range = reference.in_range(lr, valid) if reference is not None and counts.sum() else None
    return Assessment(psnr_db, shift, in_range, nodata, counts)


class Accumulator:
    """The figures of a whole file from those of its windows (`hndsr predict`): consistency from the pooled squared
    error, in-range share weighted by valid pixels, PSI of all the valid values together, the largest shift."""

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None
        self.squared = self.weight = self.inside = self.pixels = 0.0
        self.shift: float | None = None

    def add(self, assessment: Assessment, pixels: int) -> None:
        valid = float(assessment.counts[0].sum()) if assessment.counts.size else 0.0
        self.pixels += pixels
        self.counts = assessment.counts.copy() if self.counts is None else self.counts + assessment.counts
        if assessment.consistency_psnr_db is not None:
            self.squared += valid * 10 ** (-assessment.consistency_psnr_db / 10)
            self.weight += valid
        if assessment.in_range_share is not None:
            self.inside += valid * assessment.in_range_share
        if assessment.shift_px is not None:
            self.shift = max(self.shift or 0.0, assessment.shift_px)

    def total(self, reference: Reference | None) -> Assessment:
        counts = self.counts if self.counts is not None else np.zeros((0, BINS + 2), dtype=np.int64)
        valid = float(counts[0].sum()) if counts.size else 0.0
        psnr_db = None
        if self.weight:
            mse = self.squared / self.weight
            psnr_db = MAX_PSNR_DB if mse <= 10 ** (-MAX_PSNR_DB / 10) else 10 * math.log10(1.0 / mse)
        return Assessment(psnr_db, self.shift, self.inside / valid if reference is not None and valid else None,
                          1.0 - valid / self.pixels if self.pixels else 0.0, counts)
