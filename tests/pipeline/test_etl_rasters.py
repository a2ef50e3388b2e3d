"""The ETL on the real rasters of imagery/geotiff: stored data types and bands kept, nodata tiles dropped and
counted, the radiometry recorded (fixed and per-band percentiles of the training split), each source's CRS and
pixel size in the manifest, and GeoTIFF sources from S3 read like the same files in a folder."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.windows import Window
from scipy.ndimage import binary_dilation

from hndsr.splits import data_spec, decode_tile, load_hr_tiles, load_pairs
from pipeline.config import EtlParams, RadiometryParams, SplitRatios
from pipeline.etl import run_etl

SPLITS = ("train", "val", "test")
TRAIN_ONLY = SplitRatios(1.0, 0.0, 0.0)  # one or two rasters cannot fill three splits


def _folder(tmp_path, geotiff, *names):
    folder = tmp_path / "src"
    folder.mkdir()
    for name in names:
        shutil.copy(geotiff / name, folder / name)
    return folder


def _rows(out) -> list[dict]:
    return [row for split in SPLITS for row in pq.read_table(out / f"{split}.parquet").to_pylist()]


def test_rasters_keep_their_type_and_the_nodata_collar_is_dropped(geotiff, tmp_path, dataset_checker):
    src = _folder(tmp_path, geotiff, "landsat7_rgb_byte_nodata.tif", "landsat8_rgb_uint16.tif")
    params = EtlParams(source=str(src), tile_size=60, scales=[2, 3, 4], min_tile_std=1.0,
                       splits=TRAIN_ONLY, radiometry=RadiometryParams(scale={"16bit": 40000.0}))
    report = run_etl(params, tmp_path / "out")
    manifest = dataset_checker(tmp_path / "out", tile_size=60, scales=[2, 3, 4])
    sources = {s["id"]: s for s in manifest["sources"]}
    with rasterio.open(src / "landsat7_rgb_byte_nodata.tif") as l7, rasterio.open(src / "landsat8_rgb_uint16.tif") as l8:
        assert sources["landsat7_rgb_byte_nodata.tif"]["crs"] == l7.crs.to_string() == "EPSG:32618"
        assert sources["landsat8_rgb_uint16.tif"]["crs"] == l8.crs.to_string() == "EPSG:32620"
        assert sources["landsat7_rgb_byte_nodata.tif"]["pixel_size"] == pytest.approx([300.0379266750948, 300.041782729805])
        assert sources["landsat8_rgb_uint16.tif"]["dtype"] == "uint16" and sources["landsat8_rgb_uint16.tif"]["nodata"] is None
        mask7 = l7.dataset_mask() > 0
        l8_values = l8.read()
    assert manifest["data"]["radiometry"]["16bit"] == {"method": "fixed", "low": [0.0] * 3, "high": [40000.0] * 3}
    dropped = manifest["inputs"]["tiles_dropped"]
    assert dropped["nodata"] > 0 and "nodata" in report.summary()
    rows = _rows(tmp_path / "out")
    assert {r["dtype"] for r in rows if r["source_id"].startswith("landsat8")} == {"uint16"}
    assert {r["dtype"] for r in rows if r["source_id"].startswith("landsat7")} == {"uint8"}
    for row in rows:
        if row["source_id"].startswith("landsat7"):  # no kept tile reaches into the collar (max share 0)
            assert mask7[row["y"] : row["y"] + 60, row["x"] : row["x"] + 60].all()
        else:  # 16-bit tiles are the file's own values, not reduced to 8 bits
            hr = decode_tile(row["hr_image"])
            expected = l8_values[:, row["y"] : row["y"] + 60, row["x"] : row["x"] + 60].transpose(1, 2, 0)
            np.testing.assert_array_equal(hr, expected)
            assert hr.max() > 255
    # Training reads them as model values by the recorded radiometry.
    tiles = load_hr_tiles(tmp_path / "out", "train")
    assert tiles.pixels.dtype.is_floating_point and float(tiles.pixels.min()) >= 0 and float(tiles.pixels.max()) <= 1
    pairs = next(iter(load_pairs(tmp_path / "out", "train").values()))
    assert pairs.lr.shape[1] == 3 and data_spec(tmp_path / "out").channels == 3


def test_a_declared_nodata_share_keeps_edge_tiles_and_fills_their_nodata(geotiff, tmp_path):
    src = _folder(tmp_path, geotiff, "landsat7_rgb_byte_nodata.tif")
    strict = run_etl(EtlParams(source=str(src), tile_size=60, scales=[2, 3], splits=TRAIN_ONLY), tmp_path / "strict")
    lenient = run_etl(EtlParams(source=str(src), tile_size=60, scales=[2, 3], max_nodata_share=0.5,
                                splits=TRAIN_ONLY), tmp_path / "lenient")
    assert lenient.manifest["inputs"]["tiles_dropped"]["nodata"] < strict.manifest["inputs"]["tiles_dropped"]["nodata"]
    assert lenient.manifest["inputs"]["tiles_kept"] > strict.manifest["inputs"]["tiles_kept"]
    with rasterio.open(src / "landsat7_rgb_byte_nodata.tif") as dataset:
        mask = dataset.dataset_mask() > 0
    partial = 0
    for row in _rows(tmp_path / "lenient"):
        valid = mask[row["y"] : row["y"] + 60, row["x"] : row["x"] + 60]
        assert valid.mean() >= 0.5
        if not valid.all():
            partial += 1
            hr = decode_tile(row["hr_image"]).astype(np.float64)
            # The collar (0, 0, 0) is filled from its valid neighbours: close to the valid pixels along its edge
            # (the scene's own dark margin here), and not left at the fill value.
            ring = valid & binary_dilation(~valid)
            filled = hr[~valid]
            assert (filled == 0).all(axis=1).mean() < 0.05
            assert abs(filled.mean() - hr[ring].mean()) < 15
    assert partial > 0


def test_percentile_radiometry_comes_from_the_training_split(geotiff, tmp_path):
    src = _folder(tmp_path, geotiff, "landsat8_rgb_uint16.tif", "reflectance_4band_float64.tif")
    params = EtlParams(source=str(src), tile_size=60, scales=[2, 3], splits=TRAIN_ONLY,
                       source_bands={"reflectance_*": [3, 2, 1]}, radiometry=RadiometryParams(method="percentile"))
    report = run_etl(params, tmp_path / "out")
    radiometry = report.manifest["data"]["radiometry"]
    assert radiometry["8bit"]["method"] == "fixed"
    for kind, name, bands in (("16bit", "landsat8_rgb_uint16.tif", [1, 2, 3]),
                              ("float", "reflectance_4band_float64.tif", [3, 2, 1])):
        assert radiometry[kind]["method"] == "percentile"
        assert report.manifest["radiometry"]["computed_on"][kind]["pixels"] > 1000
        with rasterio.open(src / name) as dataset:
            tiled = dataset.read(bands, window=Window(0, 0, dataset.width // 60 * 60, dataset.height // 60 * 60))
        values = tiled.reshape(3, -1).astype(np.float64)
        low, high = np.percentile(values, [1, 99], axis=1)
        span = high - low
        # A reduced-resolution sample of the same pixels: within 3 % of the range of the full-resolution figures.
        np.testing.assert_allclose(radiometry[kind]["low"], low, atol=0.03 * span.max())
        np.testing.assert_allclose(radiometry[kind]["high"], high, atol=0.03 * span.max())
    assert {s["id"]: s["bands_read"] for s in report.manifest["sources"]}["reflectance_4band_float64.tif"] == [3, 2, 1]
    tiles = load_hr_tiles(tmp_path / "out", "train")
    spread = np.percentile(tiles.pixels.numpy().transpose(1, 0, 2, 3).reshape(3, -1), [1, 99], axis=1)
    assert (spread[0] < 0.15).all() and (spread[1] > 0.85).all()  # each band spread over [0, 1], both kinds


def test_png_sources_cannot_feed_a_four_band_model(geotiff, realsat, tmp_path):
    src = _folder(tmp_path, geotiff, "naip_rgbn_2009.tif")
    shutil.copy(realsat / "landsat8_grenada.png", src / "photo.png")
    report = run_etl(EtlParams(source=str(src), tile_size=60, scales=[2, 3], bands=[1, 2, 3, 4],
                               band_names=["red", "green", "blue", "nir"], splits=TRAIN_ONLY), tmp_path / "out")
    assert report.manifest["skipped"] == [{"source": "photo.png", "reason": report.manifest["skipped"][0]["reason"]}]
    assert "PNG and JPEG images are RGB" in report.manifest["skipped"][0]["reason"]
    assert report.manifest["data"]["bands"] == ["red", "green", "blue", "nir"]
    assert {r["bands"] for r in _rows(tmp_path / "out")} == {4}


def test_a_band_the_raster_lacks_is_a_skip_naming_the_fix(geotiff, tmp_path):
    src = _folder(tmp_path, geotiff, "naip_rgbn_2009.tif", "landsat8_rgb_uint16.tif")
    report = run_etl(EtlParams(source=str(src), tile_size=60, scales=[2, 3], bands=[1, 2, 3, 4],
                               min_tile_std=1.0, splits=TRAIN_ONLY), tmp_path / "out")
    reason = {s["source"]: s["reason"] for s in report.manifest["skipped"]}["landsat8_rgb_uint16.tif"]
    assert "band 4 does not exist: the raster has bands 1..3" in reason and "etl.source_bands" in reason


def test_a_raster_that_fails_part_way_keeps_what_was_read_and_says_so(geotiff, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with rasterio.open(geotiff / "landsat8_rgb_uint16.tif") as dataset:
        values, crs, transform = dataset.read(), dataset.crs, dataset.transform
    path = src / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[2], height=values.shape[1], count=3,
                       dtype="uint16", crs=crs, transform=transform, tiled=True, blockxsize=64, blockysize=64,
                       compress="deflate", interleave="band") as target:
        target.write(values)
    with rasterio.open(path) as dataset:  # the compressed bytes of a block near the bottom
        offset = int(dataset.get_tag_item("BLOCK_OFFSET_1_6", "TIFF", bidx=1))
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * 64)
    report = run_etl(EtlParams(source=str(src), tile_size=60, scales=[2, 3], min_tile_std=1.0,
                               splits=TRAIN_ONLY), tmp_path / "out")
    record = report.manifest["sources"][0]
    assert 0 < record["tiles_kept"] < (values.shape[1] // 60) * (values.shape[2] // 60)
    # Tile row 6 reaches the broken block; rows are settled one behind (the guard band), so 5 are in.
    assert record["incomplete"].startswith("reading failed after 5 tile rows") and "IReadBlock failed" in record["incomplete"]
    assert len(_rows(tmp_path / "out")) == 2 * record["tiles_kept"]
