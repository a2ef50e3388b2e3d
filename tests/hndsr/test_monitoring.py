"""The label-free monitoring figures (hndsr/monitoring.py): histograms, training range, PSI, consistency."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hndsr import monitoring
from hndsr.degradation import degrade, hr_size
from hndsr.images import decode_rgb


def _reference(values: np.ndarray, names=("red", "green", "blue"), consistency=None) -> monitoring.Reference:
    record = {"format_version": monitoring.FORMAT_VERSION,
              "input": monitoring.input_reference(monitoring.band_counts(values), list(names), "test"),
              "consistency": consistency}
    return monitoring.Reference.from_record(json.loads(json.dumps(record)))  # as read back from reference.json


def test_bins_put_values_below_and_above_the_model_range_in_the_outer_bins():
    values = np.array([-0.2, 0.0, 0.5 / 64, 1 / 64, 0.999, 1.0, 1.7, np.nan])
    assert monitoring.bin_index(values).tolist() == [0, 1, 1, 2, 64, 65, 65, 0]
    counts = monitoring.band_counts(values.reshape(2, 4, 1))
    assert counts.shape == (1, monitoring.BINS + 2) and counts.sum() == 8


def test_valid_mask_and_bands_are_counted_apart():
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, (20, 30, 4)).astype(np.float32)
    values[..., 3] = 0.25
    valid = np.zeros((20, 30), dtype=bool)
    valid[:10] = True
    counts = monitoring.band_counts(values, valid)
    assert counts.shape == (4, monitoring.BINS + 2) and (counts.sum(axis=1) == 300).all()
    assert counts[3, monitoring.bin_index(np.array([0.25]))[0]] == 300


def test_training_range_and_psi_groups_follow_the_reference():
    rng = np.random.default_rng(1)
    values = rng.uniform(0.2, 0.6, (200, 200, 1)).astype(np.float32)
    reference = _reference(values, names=("gray",))
    band = reference.bands[0]
    assert band.low == pytest.approx(0.2, abs=2 / 64) and band.high == pytest.approx(0.6, abs=2 / 64)
    groups = monitoring.grouped(band.counts, list(band.cuts))
    assert 8 <= len(groups) <= 10 and groups.max() / groups.sum() < 0.2  # about a tenth each


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_darkened_one():
    rng = np.random.default_rng(2)
    training = rng.beta(2, 3, (300, 300, 3)).astype(np.float32)
    reference = _reference(training)
    same = rng.beta(2, 3, (100, 100, 3)).astype(np.float32)
    assert max(reference.psi(monitoring.band_counts(same))) < 0.02
    darker = same * 0.5
    assert min(reference.psi(monitoring.band_counts(darker))) > 0.5
    # in range: the training range (0.1-99.9th percentiles) holds nearly all of the same, less of a brightened one
    assert reference.in_range(same, None) > 0.98
    assert reference.in_range(np.clip(same * 2.5, 0, 1.2), None) < 0.7


def test_psi_formula_on_known_shares():
    reference = np.array([50, 50])
    observed = np.array([80, 20])
    expected = (0.8 - 0.5) * np.log(0.8 / 0.5) + (0.2 - 0.5) * np.log(0.2 / 0.5)
    assert monitoring.psi(reference, observed) == pytest.approx(expected)
    assert monitoring.psi(reference, reference) == 0


def test_consistency_of_the_exact_upsampling_is_high_and_of_a_shifted_one_low(realsat):
    pixels = decode_rgb((realsat / sorted(p.name for p in realsat.glob("*.png"))[0]).read_bytes(), max_pixels=10**8)
    lr = (pixels[:96, :96].astype(np.float32) / 255)
    scale = 2.0
    size = hr_size(96, scale)
    # An HR whose shrink is the LR: the LR upsampled and corrected once by the shrink's error (back-projection).
    x = torch.from_numpy(lr).permute(2, 0, 1)[None]
    hr = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    for _ in range(5):
        hr = hr + torch.nn.functional.interpolate(x - degrade(hr, scale), size=(size, size), mode="bicubic",
                                                  align_corners=False)
    good = hr[0].permute(1, 2, 0).clamp(0, 1).numpy()
    psnr_db, shift = monitoring.consistency(good, lr, None, scale)
    assert psnr_db > 35 and shift < 0.1
    moved = np.roll(good, (6, 4), axis=(0, 1))  # 3 and 2 LR px
    moved_db, moved_shift = monitoring.consistency(moved, lr, None, scale)
    assert moved_db < psnr_db - 10 and moved_shift == pytest.approx(np.hypot(3, 2), abs=0.3)
    noisy = np.clip(good + np.random.default_rng(0).normal(0, 0.2, good.shape), 0, 1).astype(np.float32)
    assert monitoring.consistency(noisy, lr, None, scale)[0] < psnr_db - 5


def test_assess_reports_nodata_in_range_and_its_own_psi():
    rng = np.random.default_rng(3)
    reference = _reference(rng.uniform(0, 1, (100, 100, 3)).astype(np.float32))
    lr = rng.uniform(0, 1, (40, 40, 3)).astype(np.float32)
    valid = np.ones((40, 40), dtype=bool)
    valid[:10] = False
    output = torch.nn.functional.interpolate(torch.from_numpy(lr).permute(2, 0, 1)[None], scale_factor=2,
                                             mode="bicubic")[0].permute(1, 2, 0).clamp(0, 1).numpy()
    figures = monitoring.assess(lr, valid, output, 2.0, reference)
    assert figures.nodata_share == pytest.approx(0.25)
    assert figures.counts.sum(axis=1).tolist() == [1200] * 3
    assert figures.in_range_share > 0.9
    report = figures.to_dict(reference)
    assert set(report) == {"consistency_psnr_db", "shift_px", "in_range_share", "nodata_share", "psi"}
    without = monitoring.assess(lr, None, output, 2.0, None).to_dict(None)
    assert without["in_range_share"] is None and without["psi"] is None and without["consistency_psnr_db"] > 0


def test_a_file_total_pools_its_windows():
    rng = np.random.default_rng(4)
    reference = _reference(rng.uniform(0, 1, (50, 50, 3)).astype(np.float32))
    counts = monitoring.band_counts(rng.uniform(0, 1, (10, 10, 3)))
    total = monitoring.Accumulator()
    total.add(monitoring.Assessment(30.0, 0.1, 1.0, 0.0, counts), 100)
    total.add(monitoring.Assessment(40.0, 0.3, 0.5, 0.5, counts), 200)
    pooled = total.total(reference)
    assert pooled.consistency_psnr_db == pytest.approx(10 * np.log10(1 / ((1e-3 + 1e-4) / 2)))
    assert pooled.in_range_share == pytest.approx(0.75) and pooled.shift_px == 0.3
    assert pooled.nodata_share == pytest.approx(1 - 200 / 300)


def test_reference_from_another_format_is_refused():
    with pytest.raises(ValueError, match="format"):
        monitoring.Reference.from_record({"format_version": 99, "input": {"bands": []}})
