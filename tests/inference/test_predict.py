"""`hndsr predict` as a real command on the real rasters of imagery/geotiff (GeoTIFF in, GeoTIFF out),
with small random-weight models of 3 and 4 bands (georeference, types, bands and nodata do not depend on quality)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.enums import MaskFlags
from rasterio.io import MemoryFile
from rio_cogeo.cogeo import cog_validate

from hndsr.degradation import hr_size
from tests.serving.test_server import write_model

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
RGBN = ("red", "green", "blue", "nir")
FILES = {  # file: bands of the model that takes it
    "landsat7_rgb_byte_nodata.tif": 3,
    "landsat8_rgb_uint16.tif": 3,
    "naip_rgbn_2009.tif": 4,
    "landsat_4band_2020.tif": 4,
    "reflectance_4band_float64.tif": 4,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("predict-models")
    # `local`: an autoencoder that keeps every pixel value and the operator at zero, so with steps 0 the output is
    # close to the bicubic upscale and its values can be compared with the input's.
    return {3: write_model(root / "rgb", seed=0, local=True),
            4: write_model(root / "rgbn", seed=0, local=True, bands=RGBN, scales={"float": 10000.0})}


def run_predict(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HNDSR_PASS_MEGAPIXELS": "0.05", **(env or {})}
    return subprocess.run([str(BIN / "hndsr"), "predict", *map(str, args)], env=full, capture_output=True, text=True,
                          timeout=600)


def upscaled_mask(valid: np.ndarray, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """Written out independently: output pixel j lies over LR pixel floor((j + 0.5) / scale)."""
    ys = np.minimum(np.floor((np.arange(shape[0]) + 0.5) / scale).astype(int), valid.shape[0] - 1)
    xs = np.minimum(np.floor((np.arange(shape[1]) + 0.5) / scale).astype(int), valid.shape[1] - 1)
    return valid[np.ix_(ys, xs)]


def check_georeferenced_output(source: Path, output: Path, scale: float) -> None:
    with rasterio.open(source) as src, rasterio.open(output) as out:
        assert out.crs == src.crs
        expected = src.transform @ Affine.scale(1 / scale)
        assert out.transform.almost_equals(expected, precision=1e-9)
        assert (out.transform.c, out.transform.f) == (src.transform.c, src.transform.f)  # same origin
        assert (out.height, out.width) == (hr_size(src.height, scale), hr_size(src.width, scale))
        assert out.dtypes == src.dtypes and out.count == src.count
        assert out.nodata == src.nodata
        data, valid_in = out.read(), src.dataset_mask() > 0
        valid_out = out.dataset_mask() > 0
        np.testing.assert_array_equal(valid_out, upscaled_mask(valid_in, scale, valid_out.shape))
        if src.nodata is not None and not valid_in.all():
            assert (data[:, ~valid_out] == src.nodata).all()
        source_values = src.read()[:, valid_in].astype(np.float64)
        values = data[:, valid_out].astype(np.float64)
        if src.dtypes[0] == "uint16":
            assert values.max() > 255  # the input's radiometric scale, not 0..255
        low, high = source_values.min(), source_values.max()
        assert low - 0.1 * (high - low) <= values.min() and values.max() <= high + 0.1 * (high - low)
        assert abs(values.mean() - source_values.mean()) < 0.02 * (high - low)
        assert out.block_shapes[0][0] in (out.height, 512) or out.profile.get("tiled") is False
        assert out.compression is not None


def written_once_size(output: Path) -> int:
    """Bytes of the output's pixels, mask and georeference written in one go into a Cloud-Optimized GeoTIFF with
    the same options (GDAL's COG driver from an in-memory copy)."""
    with rasterio.open(output) as src, rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), MemoryFile() as plain:
        profile = {k: v for k, v in src.profile.items() if k not in ("compress", "predictor")}
        with plain.open(**profile) as copy:
            copy.write(src.read())
            if src.nodata is None and MaskFlags.per_dataset in src.mask_flag_enums[0]:
                copy.write_mask(src.dataset_mask())
        with MemoryFile() as cog:
            rasterio.shutil.copy(plain.name, cog.name, driver="COG", COMPRESS="DEFLATE", PREDICTOR="YES",
                                 BLOCKSIZE="512", OVERVIEW_RESAMPLING="AVERAGE")
            return len(cog.read())


def check_cloud_optimized(output: Path) -> None:
    """A valid COG (rio-cogeo's validator: tiled, overviews, the layout readers over HTTP expect) of at most 1.1x
    the size of its pixels written once: windows that share a block must not leave dead space behind."""
    valid, errors, _ = cog_validate(str(output), strict=True, quiet=True)  # warnings count as errors
    assert valid, f"{output.name} is not a Cloud-Optimized GeoTIFF: {errors}"
    with rasterio.open(output) as out:
        assert out.overviews(1), f"{output.name} has no overviews"
    size, once = output.stat().st_size, written_once_size(output)
    assert size <= 1.1 * once, f"{output.name}: {size} bytes, {size / once:.2f}x its pixels written once ({once})"


def test_every_real_geotiff_keeps_its_georeference_type_bands_and_nodata(geotiff, models, tmp_path):
    for name, bands in FILES.items():
        out = tmp_path / f"out{bands}"
        # x2.5 with 256 px windows: several windows per scene, a non-integer scale.
        result = run_predict(geotiff / name, "--out", out, "--scale", "2.5", "--model", models[bands],
                             "--window", "256", "--steps", "0")
        assert result.returncode == 0, result.stderr[-3000:]
        check_georeferenced_output(geotiff / name, out / name, 2.5)
        check_cloud_optimized(out / name)  # 8-bit with nodata, 16-bit, 4-band, float64 reflectance
        report = json.loads((out / name.replace(".tif", ".consistency.json")).read_text())
        figures = report["consistency"]
        assert report["windows"] > 1 and report["scale"] == 2.5
        assert len(figures["reflectance_rmse"]) == bands and figures["spectral_angle_deg"] >= 0
        # In stored units against the input as stored: small for this near-bicubic model, never exactly zero.
        assert 0 < figures["reflectance_nrmse"] < 0.05 and min(figures["reflectance_rmse"]) > 0, figures
        assert abs(figures["shift_px"]["dy"]) < 0.5 and abs(figures["shift_px"]["dx"]) < 0.5
        # The server's label-free figures, per scene window and for the file (no reference: consistency and nodata)
        watched = report["monitoring"]
        assert len(watched["windows"]) == report["windows"] and watched["consistency_psnr_db"] > 20
        assert 0 <= watched["nodata_share"] < 1 and watched["psi"] is None and watched["reference"] is None
        assert all(w["consistency_psnr_db"] > 20 for w in watched["windows"] if w["consistency_psnr_db"] is not None)
        with rasterio.open(out / name) as written:
            assert written.tags()["HNDSR_SCALE"] == "2.5" and written.tags()["HNDSR_MODEL_VERSION"] == "local"


def test_a_band_count_the_model_does_not_take_is_reported_and_skipped(geotiff, models, tmp_path):
    result = run_predict(geotiff / "naip_rgbn_2009.tif", geotiff / "landsat8_rgb_uint16.tif", "--out", tmp_path,
                         "--scale", "2", "--model", models[3], "--steps", "0")
    assert result.returncode == 1
    assert "the model expects 3 bands (red, green, blue); the raster has 4 data bands; choose them with --bands" \
        in result.stdout
    assert (tmp_path / "landsat8_rgb_uint16.tif").is_file() and not (tmp_path / "naip_rgbn_2009.tif").exists()
    chosen = run_predict(geotiff / "naip_rgbn_2009.tif", "--out", tmp_path / "chosen", "--scale", "2", "--model",
                         models[3], "--steps", "0", "--bands", "1,2,3")
    assert chosen.returncode == 0, chosen.stderr[-2000:]
    with rasterio.open(tmp_path / "chosen" / "naip_rgbn_2009.tif") as out:
        assert out.count == 3


def test_float_reflectance_in_other_units_than_the_model_maps_is_refused_not_clipped(geotiff, models, tmp_path):
    """reflectance_4band_float64.tif holds reflectance x 10000 (336-4269); the RGB model maps floats from 0..1,
    so its bands 1-3 would all be clipped to 1.0: refused, nothing written. The RGBN model maps 0..10000."""
    source = geotiff / "reflectance_4band_float64.tif"
    refused = run_predict(source, "--out", tmp_path / "rgb", "--scale", "2.5", "--model", models[3], "--steps", "0",
                          "--bands", "1,2,3")
    assert refused.returncode == 1
    assert "band 1's values lie in 488..2102, but this model maps float64 values from 0..1 (fixed radiometry" \
        in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    assert not list((tmp_path / "rgb").glob("*.tif")) and not list((tmp_path / "rgb").glob(".*"))
    taken = run_predict(source, "--out", tmp_path / "rgbn", "--scale", "2.5", "--model", models[4], "--steps", "0")
    assert taken.returncode == 0, taken.stderr[-2000:]


def test_valid_pixels_do_not_depend_on_what_the_nodata_pixels_hold(geotiff, models, tmp_path):
    """The Landsat 7 collar holds 0 (its nodata value). A copy whose collar holds 255 and is marked by an internal
    mask instead must give exactly the same valid output pixels: nodata is filled from valid neighbours before
    inference, so no valid pixel is pulled toward the fill value, whatever it is."""
    source = geotiff / "landsat7_rgb_byte_nodata.tif"
    masked = tmp_path / "in" / "landsat7_masked.tif"
    masked.parent.mkdir()
    with rasterio.open(source) as src:
        valid = src.dataset_mask() > 0
        data = src.read()
        data[:, ~valid] = 255
        profile = {**src.profile, "nodata": None}
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(masked, "w", **profile) as dst:
            dst.write(data)
            dst.write_mask(valid.astype(np.uint8) * 255)
    for path in (source, masked):
        result = run_predict(path, "--out", tmp_path / "out", "--scale", "2", "--model", models[3], "--steps", "0",
                             "--window", "384")
        assert result.returncode == 0, result.stderr[-3000:]
    with rasterio.open(tmp_path / "out" / source.name) as a, rasterio.open(tmp_path / "out" / masked.name) as b:
        valid_a, valid_b = a.dataset_mask() > 0, b.dataset_mask() > 0
        np.testing.assert_array_equal(valid_a, valid_b)  # the internal mask is carried as the output's mask
        assert b.nodata is None and 0.6 < valid_b.mean() < 0.7
        with_nodata, with_mask = a.read()[:, valid_a], b.read()[:, valid_b]
        # Identical, except that a valid pixel that came out (0, 0, 0) reads (1, 0, 0) where 0 is the nodata value.
        nudged = (with_mask == 0).all(axis=0)
        np.testing.assert_array_equal(with_nodata[:, ~nudged], with_mask[:, ~nudged])
        assert (with_nodata[:, nudged] == np.array([[1], [0], [0]])).all() and nudged.mean() < 0.01


def test_target_resolution_at_a_non_integer_scale(geotiff, models, tmp_path):
    source = geotiff / "landsat8_rgb_uint16.tif"  # 60 m pixels; 24 m is x2.5
    result = run_predict(source, "--out", tmp_path, "--target-res", "24", "--model", models[3], "--steps", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    with rasterio.open(source) as src, rasterio.open(tmp_path / source.name) as out:
        assert (out.transform.a, -out.transform.e) == (24.0, 24.0)
        assert (out.transform.c, out.transform.f) == (src.transform.c, src.transform.f)
        assert (out.height, out.width) == (hr_size(src.height, 2.5), hr_size(src.width, 2.5))
    too_fine = run_predict(source, "--out", tmp_path / "fine", "--target-res", "10", "--model", models[3])
    assert too_fine.returncode == 1 and "means scale 6, outside the model's range [2, 4]" in too_fine.stdout


def test_like_puts_the_output_on_a_reference_grid(geotiff, models, tmp_path):
    source = geotiff / "landsat8_rgb_uint16.tif"  # 60 m pixels
    with rasterio.open(source) as src:
        crs, t = src.crs, src.transform
        size = (hr_size(src.height, 2.5), hr_size(src.width, 2.5))
    for name, shift in (("aligned.tif", 5 * 24.0), ("shifted.tif", 5 * 24.0 + 7.0)):  # metres west and north
        reference = Affine(24.0, 0.0, t.c - shift, 0.0, -24.0, t.f + shift)
        with rasterio.open(tmp_path / name, "w", driver="GTiff", width=16, height=16, count=1, dtype="uint8",
                           crs=crs, transform=reference) as dst:
            dst.write(np.zeros((1, 16, 16), np.uint8))
    result = run_predict(source, "--out", tmp_path / "out", "--like", tmp_path / "aligned.tif", "--model",
                         models[3], "--steps", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    with rasterio.open(tmp_path / "out" / source.name) as out:
        assert out.transform == Affine(24.0, 0.0, t.c, 0.0, -24.0, t.f)
        assert (out.height, out.width) == size and out.crs == crs
    shifted = run_predict(source, "--out", tmp_path / "out2", "--like", tmp_path / "shifted.tif", "--model",
                          models[3])
    assert shifted.returncode == 1 and "0.292 of a shifted.tif pixel off its grid" in shifted.stdout


def test_uncertainty_is_zero_without_diffusion_and_positive_with_it(geotiff, models, tmp_path):
    source = geotiff / "landsat8_rgb_uint16.tif"
    spreads = {}
    for steps in (0, 2):
        out = tmp_path / f"steps{steps}"
        result = run_predict(source, "--out", out, "--scale", "2", "--model", models[3], "--steps", steps,
                             "--uncertainty", "3")
        assert result.returncode == 0, result.stderr[-3000:]
        with rasterio.open(out / "landsat8_rgb_uint16.uncertainty.tif") as unc, rasterio.open(out / source.name) as sr:
            assert unc.count == 1 and unc.dtypes[0] == "float32" and unc.transform == sr.transform
            spreads[steps] = unc.read(1)
        check_cloud_optimized(out / "landsat8_rgb_uint16.uncertainty.tif")
        # The main output is the first seed's, exactly what a run without --uncertainty gives.
        plain = run_predict(source, "--out", tmp_path / f"plain{steps}", "--scale", "2", "--model", models[3],
                            "--steps", steps)
        assert plain.returncode == 0
        with rasterio.open(out / source.name) as a, rasterio.open(tmp_path / f"plain{steps}" / source.name) as b:
            np.testing.assert_array_equal(a.read(), b.read())
    assert (spreads[0] == 0).all()
    assert spreads[2].mean() > 1.0  # uint16 units


def test_windows_join_without_seams(geotiff, tmp_path):
    """With a model whose output at a pixel depends on its neighbourhood only, small windows give what one
    window gives (the windows' halos cover the model's reach and their origins lie on the scale's lattice)."""
    model = write_model(tmp_path / "local", seed=0, local=True)
    source = geotiff / "landsat8_rgb_uint16.tif"
    for window in (512, 4096):  # 16 windows of 140 LR px (+ 32 px halos), and one
        result = run_predict(source, "--out", tmp_path / f"w{window}", "--scale", "2.5", "--model", model,
                             "--steps", "0", "--window", window,
                             env={"HNDSR_PASS_MEGAPIXELS": "20", "HNDSR_PRECISION": "float32"})
        assert result.returncode == 0, result.stderr[-3000:]
    with rasterio.open(tmp_path / "w512" / source.name) as a, rasterio.open(tmp_path / "w4096" / source.name) as b:
        assert json.loads((tmp_path / "w512" / "landsat8_rgb_uint16.consistency.json").read_text())["windows"] == 16
        difference = np.abs(a.read().astype(np.int64) - b.read().astype(np.int64))
        assert difference.max() <= 2, difference.max()  # uint16 units: rounding of float32 sums only


def test_png_in_gives_png_out_and_existing_outputs_are_kept(realsat, models, tmp_path):
    image = sorted(realsat.glob("*.png"))[0]
    folder = tmp_path / "in" / "sub"
    folder.mkdir(parents=True)
    shutil.copy(image, folder / image.name)
    result = run_predict(tmp_path / "in", "--out", tmp_path / "out", "--scale", "2", "--model", models[3],
                         "--steps", "0", env={"HNDSR_PASS_MEGAPIXELS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    written = tmp_path / "out" / "sub" / image.with_suffix(".png").name
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(written.with_name(f"{image.stem}.consistency.json").read_text())
    assert report["scale"] == 2 and report["monitoring"]["consistency_psnr_db"] > 20
    assert report["monitoring"]["nodata_share"] == 0 and report["monitoring"]["shift_px"] < 0.5
    again = run_predict(tmp_path / "in", "--out", tmp_path / "out", "--scale", "2", "--model", models[3])
    assert again.returncode == 1 and "exists (use --overwrite to replace it)" in again.stdout


def test_nan_in_a_float_raster_is_nodata_and_comes_back_as_nan(geotiff, models, tmp_path):
    """Float reflectance often marks missing pixels with NaN and no declared nodata value."""
    holed = tmp_path / "in" / "reflectance_nan.tif"
    holed.parent.mkdir()
    with rasterio.open(geotiff / "reflectance_4band_float64.tif") as src:
        data = src.read()
        data[:, 50:90, 100:160] = np.nan
        data[2, 10, 10] = np.nan  # one band missing: the pixel is not valid
        with rasterio.open(holed, "w", **src.profile) as dst:
            dst.write(data)
    result = run_predict(holed, "--out", tmp_path / "out", "--scale", "2", "--model", models[4], "--steps", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    with rasterio.open(tmp_path / "out" / holed.name) as out:
        values = out.read()
        expected_valid = upscaled_mask(np.isfinite(data).all(axis=0), 2.0, values.shape[1:])
        np.testing.assert_array_equal(np.isfinite(values).all(axis=0), expected_valid)
        assert np.isnan(values[:, ~expected_valid]).all()
        assert out.nodata is None and out.dtypes[0] == "float64"
        finite = values[:, expected_valid]
        assert finite.min() > 200 and finite.max() < 5000  # reflectance x 10000, not pulled toward anything
