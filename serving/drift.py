"""What the server records of each answer's label-free figures (hndsr.monitoring): Prometheus histograms of
consistency, in-range and nodata shares per version (and client), and the input drift of a sliding window per
version and client (`hndsr_input_psi`: PSI per band against the version's training reference).

Label sets stay bounded: versions are the ones being served (a version that stops being served loses its series),
clients the named ones of HNDSR_API_KEYS_FILE ("" without named clients), bands the model's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from hndsr.monitoring import Assessment
from inference.engine import LoadedModel
from serving.metrics import Metrics

log = logging.getLogger("hndsr.serving")


@dataclass
class _Window:
    """The input histograms of one version and client over the last `window_s` seconds (at most `max_requests`)."""

    entries: deque = field(default_factory=deque)  # (time.monotonic(), (C, BINS + 2) counts)
    total: np.ndarray | None = None

    def add(self, counts: np.ndarray, now: float, window_s: float, max_requests: int) -> None:
        self.entries.append((now, counts))
        self.total = counts.copy() if self.total is None else self.total + counts
        while self.entries and (len(self.entries) > max_requests or self.entries[0][0] < now - window_s):
            _, old = self.entries.popleft()
            self.total -= old


class Drift:
    def __init__(self, metrics: Metrics, window_s: float, max_requests: int) -> None:
        self.metrics, self.window_s, self.max_requests = metrics, window_s, max_requests
        self._windows: dict[tuple[str, str], _Window] = {}
        self._bands: dict[str, tuple[str, ...]] = {}  # version -> band names with PSI series
        self._references: set[str] = set()  # versions whose reference gauges are set
        self._clients: dict[str, set[str]] = {}  # version -> clients with series

    def observe(self, loaded: LoadedModel, client: str, assessment: Assessment, served: set[str]) -> float | None:
        """Record one answer of `loaded` for `client` ("" when clients are not named); `served`: the versions being
        served now (the others' series are removed). Returns the window's PSI (largest over bands), if any."""
        self._prune(served)
        version = str(loaded.info["version"])
        self._clients.setdefault(version, set()).add(client)
        m = self.metrics
        if assessment.consistency_psnr_db is not None:
            m.consistency.labels(version=version).observe(assessment.consistency_psnr_db)
        if assessment.shift_px is not None:
            m.consistency_shift.labels(version=version).observe(assessment.shift_px)
        m.nodata.labels(version=version, client=client).observe(assessment.nodata_share)
        reference = loaded.reference
        if reference is None:
            return None
        if version not in self._references and reference.consistency:
            for quantile, key in (("0.05", "p05"), ("0.5", "p50"), ("0.95", "p95")):
                value = reference.consistency["psnr_db"].get(key)
                if value is not None:
                    m.consistency_reference.labels(version=version, quantile=quantile).set(value)
            self._references.add(version)
        if assessment.in_range_share is not None:
            m.in_range.labels(version=version, client=client).observe(assessment.in_range_share)
        if not assessment.counts.sum():
            return None
        window = self._windows.setdefault((version, client), _Window())
        window.add(assessment.counts, time.monotonic(), self.window_s, self.max_requests)
        values = reference.psi(window.total)
        self._bands[version] = tuple(b.name for b in reference.bands)
        for band, value in zip(reference.bands, values, strict=True):
            m.psi.labels(version=version, client=client, band=band.name).set(value if math.isfinite(value) else 0)
        m.psi_requests.labels(version=version, client=client).set(len(window.entries))
        return max(values)

    def window(self, version: str, client: str) -> int:
        """How many requests the (version, client) window holds."""
        window = self._windows.get((version, client))
        return len(window.entries) if window is not None else 0

    def _prune(self, served: set[str]) -> None:
        for version in set(self._clients) - served:
            self._forget(version)

    def _forget(self, version: str) -> None:
        m = self.metrics
        for client in self._clients.pop(version, set()):
            self._windows.pop((version, client), None)
            for band in self._bands.get(version, ()):
                _remove(m.psi, version, client, band)
            _remove(m.psi_requests, version, client)
            _remove(m.in_range, version, client)
            _remove(m.nodata, version, client)
        self._bands.pop(version, None)
        _remove(m.consistency, version)
        _remove(m.consistency_shift, version)
        for quantile in ("0.05", "0.5", "0.95"):
            _remove(m.consistency_reference, version, quantile)
        self._references.discard(version)
        log.info("version %s is no longer served: its monitoring series were removed", version)


def _remove(metric, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # no such series (never observed)
        metric.remove(*labels)
