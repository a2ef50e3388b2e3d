"""A 4-band model end to end, by the real commands: the ETL cuts the real RGBN (8-bit) and reflectance (float64,
stored B, G, R, NIR) rasters with per-band percentile radiometry, the three stages train a tiny model, `evaluate`
scores it, the gate registers and promotes it on a real `mlflow server`, and `hndsr predict` and `hndsr serve`
(both loading the registry alias) return 4-band GeoTIFFs on the refined grid."""

from __future__ import annotations

import json
import shutil
import uuid

import httpx
import pytest
import rasterio
import yaml
from rasterio.io import MemoryFile
from rasterio.windows import Window

from tests.conftest import REPO
from tests.inference.test_predict import RGBN, check_georeferenced_output
from tests.serving.test_server import Server
from tests.tracking import PROMOTE, TRAIN, run

pytestmark = pytest.mark.slow

SOURCES = ("naip_rgbn_2009.tif", "reflectance_4band_float64.tif")


def _params(raw, model_name: str) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["etl"].update(source=str(raw), tile_size=60, scales=[2, 3, 4], bands=[1, 2, 3, 4], band_names=list(RGBN),
                         source_bands={"reflectance_*": [3, 2, 1, 4]}, radiometry={"method": "percentile"},
                         group_by="block", block_tiles=2)
    for name, values in TRAIN.items():
        params[name].update(values)
    # A little more than the RGB candidates get: four bands through an 8-channel latent cap the x2 gain.
    params["train_autoencoder"].update(iterations=300, eval_every=150,
                                       model={"latent_channels": 12, "width": 16, "blocks": 1})
    params["train_operator"].update(iterations=1500, eval_every=750)
    params["train_diffusion"]["sampling"].update(steps_choices=[2], temperature_choices=[0.5],
                                                 strength_choices=[0.25])
    params["promote"].update(PROMOTE, model_name=model_name)
    return params


def _crop(source, window: Window) -> bytes:
    """A georeferenced GeoTIFF of one window of `source`, every band a data band."""
    with rasterio.open(source) as dataset:
        profile = {"driver": "GTiff", "width": window.width, "height": window.height, "count": dataset.count,
                   "dtype": dataset.dtypes[0], "crs": dataset.crs, "transform": dataset.window_transform(window),
                   "nodata": dataset.nodata, "photometric": "MINISBLACK"}
        values = dataset.read(window=window)
    with MemoryFile() as memory:
        with memory.open(**profile) as target:
            target.write(values)
        return memory.read()


@pytest.mark.timeout(900)  # trains three stages and two servers' worth of work: 170 s here
def test_four_band_model_trains_promotes_and_comes_back_as_4_band_geotiff(tmp_path, geotiff, mlflow_server,
                                                                          make_project):
    raw, project = tmp_path / "raw", tmp_path / "project"
    raw.mkdir()
    project.mkdir()
    for name in SOURCES:
        shutil.copy(geotiff / name, raw / name)
    model_name = f"hndsr-4band-{uuid.uuid4().hex[:8]}"
    (project / "params.yaml").write_text(yaml.safe_dump(_params(raw, model_name), sort_keys=False))
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    for args in (["etl", "--out", "data/processed"], ["train", "autoencoder"], ["train", "operator"],
                 ["train", "diffusion"], ["evaluate"]):
        result = run(["hndsr", *args, "--params", "params.yaml"], project, env)
        assert result.returncode == 0, f"hndsr {' '.join(args)}: {result.stdout[-2000:]}{result.stderr[-3000:]}"

    # The manifest and the checkpoint record the bands and the radiometry; each source its CRS and pixel size.
    manifest = json.loads((project / "data" / "processed" / "manifest.json").read_text())
    assert manifest["data"]["bands"] == list(RGBN)
    floats = manifest["data"]["radiometry"]["float"]
    assert floats["method"] == "percentile" and all(lo < hi for lo, hi in zip(floats["low"], floats["high"], strict=True))
    assert min(floats["low"]) > 300 and max(floats["high"]) < 4300  # reflectance x 10000, not 0..1
    assert manifest["data"]["radiometry"]["8bit"]["high"] == [255.0] * 4
    sources = {s["id"]: s for s in manifest["sources"]}
    assert sources["reflectance_4band_float64.tif"]["bands_read"] == [3, 2, 1, 4]
    with rasterio.open(geotiff / "naip_rgbn_2009.tif") as naip:
        assert sources["naip_rgbn_2009.tif"]["crs"] == naip.crs.to_string()
        assert sources["naip_rgbn_2009.tif"]["pixel_size"] == [5.0, 5.0]
    config = json.loads((project / "models" / "autoencoder" / "config.json").read_text())
    assert config["config"]["channels"] == 4 and config["data"] == manifest["data"]
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert set(evaluation["scales"]) == {"2", "3", "4"}

    promoted = run(["hndsr", "registry", "promote", "--params", "params.yaml"], project, env)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert "v1 passed the gate; production -> v1" in promoted.stdout
    uri = f"models:/{model_name}@production"

    # hndsr predict from the registry alias: both 4-band sources, each in its own data type.
    out = tmp_path / "predicted"
    for name, extra in (("naip_rgbn_2009.tif", []), ("reflectance_4band_float64.tif", ["--bands", "3,2,1,4"])):
        result = run(["hndsr", "predict", str(geotiff / name), "--out", str(out), "--scale", "2.5", "--steps", "1",
                      "--model", uri, *extra], project, env)
        assert result.returncode == 0, result.stderr[-3000:]
        check_georeferenced_output(geotiff / name, out / name, 2.5)
        with rasterio.open(out / name) as written:
            assert written.count == 4 and written.tags()["HNDSR_MODEL_VERSION"] == "1"

    # hndsr serve from the registry alias: a 4-band GeoTIFF in, a 4-band GeoTIFF out; RGB gets a 422.
    server = Server({"MODEL_URI": uri, "MLFLOW_TRACKING_URI": mlflow_server.uri, "HNDSR_PASS_MEGAPIXELS": "0.1"},
                    tmp_path)
    try:
        server.wait_ready(timeout=120)
        crop = _crop(geotiff / "naip_rgbn_2009.tif", Window(200, 100, 48, 40))
        response = httpx.post(f"{server.url}/v1/super-resolve", files={"file": ("in.tif", crop, "image/tiff")},
                              data={"scale": "2.5", "steps": "1"}, timeout=120)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/tiff" and response.headers["X-Model-Version"] == "1"
        with MemoryFile(crop) as given, given.open() as source, MemoryFile(response.content) as got, \
                got.open() as answer:
            assert (answer.count, answer.dtypes[0], answer.width, answer.height) == (4, "uint8", 120, 100)
            assert answer.crs == source.crs
            assert answer.transform.almost_equals(source.transform @ rasterio.Affine.scale(1 / 2.5), precision=1e-9)
        with (geotiff / "landsat7_rgb_byte_nodata.tif").open("rb") as rgb:
            wrong = httpx.post(f"{server.url}/v1/super-resolve", files={"file": ("rgb.tif", rgb.read(), "image/tiff")},
                               data={"scale": "2"}, timeout=60)
        assert wrong.status_code == 422 and "4 bands (red, green, blue, nir)" in wrong.text, wrong.text
    finally:
        server.stop()

    # An RGB candidate cannot replace the 4-band production by the gate: the two take different pixels, so the
    # regression check cannot compare them, the candidate is rejected and production stays.
    rgb = make_project("good", model_name=model_name)
    rejected = run(["hndsr", "registry", "promote", "--params", "params.yaml"], rgb, env)
    assert rejected.returncode == 3, rejected.stdout + rejected.stderr
    assert "production v1 takes 4 bands (red, green, blue, nir)" in rejected.stdout
    assert "production stays on v1" in rejected.stdout
