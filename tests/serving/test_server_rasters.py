"""The real server (`hndsr serve`) with the real rasters of imagery/geotiff: GeoTIFF in, GeoTIFF out with
the refined georeference, 16-bit, float and 4-band inputs per the loaded checkpoint, and clear 4xx for rasters
it cannot take."""

from __future__ import annotations

import io
import re

import httpx
import numpy as np
import pytest
from rasterio.io import MemoryFile

from hndsr import cores
from tests.inference.test_predict import FILES, RGBN, check_georeferenced_output
from tests.serving.test_server import Server, write_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("raster-servers")
    models = {3: write_model(root / "rgb", seed=0, local=True),
              4: write_model(root / "rgbn", seed=0, local=True, bands=RGBN, scales={"float": 10000.0})}
    # two servers side by side: each its share of the cores (hndsr.cores), as the README tells users
    running = {bands: Server({"MODEL_URI": str(model), "HNDSR_PASS_MEGAPIXELS": "0.1", **cores.share_env(2)}, root)
               for bands, model in models.items()}
    try:
        for server in running.values():
            server.wait_ready()
        yield running
    finally:
        for server in running.values():
            server.stop()


def post(server: Server, data: bytes, name: str = "in.tif", **fields) -> httpx.Response:
    headers = fields.pop("headers", None)
    return httpx.post(f"{server.url}/v1/super-resolve", files={"file": (name, data, "image/tiff")},
                      data={"scale": "2.5", "steps": "0", **fields}, headers=headers, timeout=300)


def test_every_real_geotiff_comes_back_on_the_map(servers, geotiff, tmp_path):
    for name, bands in FILES.items():
        # 8-bit RGB defaults to PNG; ask for TIFF by the form field for one file and by Accept for the rest.
        asked = {"format": "tiff"} if name.startswith("landsat7") else {"headers": {"Accept": "image/tiff"}}
        response = post(servers[bands], (geotiff / name).read_bytes(), **asked)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/tiff"
        (tmp_path / name).write_bytes(response.content)
        check_georeferenced_output(geotiff / name, tmp_path / name, 2.5)


def test_float_reflectance_the_model_does_not_map_is_422_not_clipped(servers, geotiff):
    response = post(servers[3], (geotiff / "reflectance_4band_float64.tif").read_bytes(), bands="1,2,3")
    assert response.status_code == 422 and response.json()["error"] == "values_out_of_range", response.text
    assert "band 1's values lie in 488..2102, but this model maps float64 values from 0..1" \
        in response.json()["detail"]


def test_the_model_card_names_the_bands_and_radiometry(servers):
    info = httpx.get(f"{servers[4].url}/v1/model", timeout=10).json()
    assert info["data"]["bands"] == list(RGBN)
    assert info["data"]["radiometry"]["float"] == {"method": "fixed", "low": [0.0] * 4, "high": [10000.0] * 4}


def test_png_stays_the_default_for_8_bit_rgb_and_tiff_for_the_rest(servers, geotiff):
    rgb8 = post(servers[3], (geotiff / "landsat7_rgb_byte_nodata.tif").read_bytes())
    assert rgb8.status_code == 200 and rgb8.headers["content-type"] == "image/png"
    uint16 = post(servers[3], (geotiff / "landsat8_rgb_uint16.tif").read_bytes())
    assert uint16.status_code == 200 and uint16.headers["content-type"] == "image/tiff"
    with MemoryFile(uint16.content) as memory, memory.open() as out:
        assert out.dtypes[0] == "uint16" and out.read().max() > 255


def test_bad_rasters_get_a_4xx_that_says_what_to_fix(servers, geotiff):
    naip = (geotiff / "naip_rgbn_2009.tif").read_bytes()
    wrong = post(servers[3], naip)
    assert wrong.status_code == 422 and wrong.json()["error"] == "wrong_bands"
    assert "the model expects 3 bands (red, green, blue); the raster has 4" in wrong.json()["detail"]
    chosen = post(servers[3], naip, bands="1,2,3", format="tiff")
    assert chosen.status_code == 200, chosen.text
    png_of_16_bit = post(servers[3], (geotiff / "landsat8_rgb_uint16.tif").read_bytes(), format="png")
    assert png_of_16_bit.status_code == 422 and "ask for format=tiff" in png_of_16_bit.json()["detail"]
    rgb_png = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(rgb_png, format="PNG")
    png_to_4_band = httpx.post(f"{servers[4].url}/v1/super-resolve", files={"file": ("a.png", rgb_png.getvalue())},
                               data={"scale": "2"}, timeout=60)
    assert png_to_4_band.status_code == 422 and "send a 4-band TIFF" in png_to_4_band.json()["detail"]
    int32 = MemoryFile()
    with int32.open(driver="GTiff", width=8, height=8, count=3, dtype="int32") as dst:
        dst.write(np.ones((3, 8, 8), np.int32))
    unsupported = post(servers[3], int32.read())
    assert unsupported.status_code == 422 and unsupported.json()["error"] == "unsupported_dtype"
    truncated = post(servers[3], naip[:5000], bands="1,2,3")
    assert truncated.status_code == 400 and "raster" in truncated.json()["detail"]
    small = MemoryFile()
    with small.open(driver="GTiff", width=64, height=64, count=3, dtype="uint8") as dst:
        dst.write(np.ones((3, 64, 64), np.uint8))
    whole = small.read()
    for cut in (whole[:300], whole[: len(whole) // 2]):  # the header only; half the pixels
        answer = post(servers[3], cut)
        assert answer.status_code == 400 and answer.json()["error"] == "bad_raster", answer.text
        detail = answer.json()["detail"]
        assert "the file is truncated or corrupt" in detail and "previous exception" not in detail, detail
        assert "vsimem" not in detail and not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-", detail), detail
    bad_bands = post(servers[3], naip, bands="1,2,9")
    assert bad_bands.status_code == 422 and "band 9 does not exist" in bad_bands.json()["detail"]
    assert httpx.get(f"{servers[3].url}/readyz", timeout=5).status_code == 200


def test_a_tiff_without_georeference_comes_back_without_one(servers):
    memory = MemoryFile()
    with memory.open(driver="GTiff", width=30, height=20, count=3, dtype="uint16") as dst:
        dst.write(np.random.default_rng(0).integers(0, 65535, (3, 20, 30), dtype=np.uint16))
    response = post(servers[3], memory.read(), format="tiff")
    assert response.status_code == 200, response.text
    with MemoryFile(response.content) as out_memory, out_memory.open() as out:
        assert out.crs is None and out.transform.is_identity and (out.width, out.height) == (75, 50)
        assert out.dtypes[0] == "uint16"


def _raster(count: int, dtype: str, size: int, interleave: str = "pixel") -> bytes:
    memory = MemoryFile()
    with memory.open(driver="GTiff", width=size, height=size, count=count, dtype=dtype, interleave=interleave,
                     compress="deflate", tiled=True, blockxsize=256, blockysize=256) as dst:
        ramp = np.add.outer(np.arange(size), np.arange(size))  # compresses well: a small upload, large when decoded
        dst.write(np.stack([(ramp + band) % 200 for band in range(count)]).astype(dtype))
    return memory.read()


def _rss_mb(server: Server) -> float:
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    return float(re.search(r"^process_resident_memory_bytes (\S+)$", metrics, re.M).group(1)) / 2**20


def test_decoding_reads_only_the_chosen_bands_within_the_band_and_bytes_limits(servers):
    """The probe's case (2,000 bands, 3 chosen) is refused from the header; at the limit (64 bands of a pixel-
    interleaved raster) the 3 chosen bands are read window by window and memory stays bounded."""
    import time

    too_many = _raster(2000, "uint8", 64)
    start = time.monotonic()
    refused = post(servers[3], too_many, bands="1,2,3")
    assert refused.status_code == 422 and refused.json()["error"] == "too_many_bands", refused.text
    assert "the raster has 2000 bands, above this server's limit of 64" in refused.json()["detail"]
    assert time.monotonic() - start < 5  # from the header, nothing decoded
    wide = _raster(17, "float64", 16)  # 136 bytes per pixel
    over = post(servers[3], wide, bands="1,2,3")
    assert over.status_code == 413 and over.json()["error"] == "input_too_large", over.text
    assert "17 bands of float64 are 136 bytes per pixel, above the limit of 128" in over.json()["detail"]

    before = _rss_mb(servers[3])
    at_limit = _raster(64, "uint8", 1024)  # 64 MB of pixels, 3 of its bands used
    answer = post(servers[3], at_limit, bands="1,2,3", steps="0", scale="2")
    assert answer.status_code == 200, answer.text
    # The chosen bands as floats (12 MB), the output (4 MP x 3), GDAL's bounded cache; never all 64 bands' floats.
    assert _rss_mb(servers[3]) - before < 600, (before, _rss_mb(servers[3]))


def test_decoding_stops_at_the_deadline(geotiff):
    """Between row windows the request's deadline is checked: a decode that passes it stops (the server's 504)."""
    import time

    from hndsr import imagefile
    from hndsr.raster import DataSpec

    data = (geotiff / "landsat8_rgb_uint16.tif").read_bytes()
    assert imagefile.decode(data, DataSpec.fixed(), None, 10**7, deadline=time.monotonic() + 60).lr.shape[2] == 3
    with pytest.raises(imagefile.DecodeTimeout, match="passed the request's deadline"):
        imagefile.decode(data, DataSpec.fixed(), None, 10**7, deadline=time.monotonic() - 1)
