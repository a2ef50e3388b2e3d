"""The web page at `/` in a real headless Chromium (Debian's chromium and chromedriver, driven by Selenium)
against a real `hndsr serve`: upload a real image, run it at a non-integer scale, check the output's size and
the model card, trigger an API error and check the page shows the API's words; screenshots are saved to
test-artifacts/ (HNDSR_UPDATE_SCREENSHOTS=1 also refreshes docs/page.png for the README)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from hndsr.degradation import hr_size
from tests.serving.test_server import Server, write_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("chromium and chromedriver are missing: `make test` installs them (Debian packages chromium, "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    chrome.set_page_load_timeout(60)
    yield chrome
    chrome.quit()


def sideways(browser) -> list[str]:
    """What makes the page scroll sideways: the elements whose right edge lies past the viewport's content width
    (the width without the vertical scroll bar), or the page itself if it is wider."""
    return browser.execute_script(
        "const w = document.documentElement.clientWidth;"
        "const wide = [...document.querySelectorAll('body *')].filter(e => e.getClientRects().length"
        "  && e.getBoundingClientRect().right > w + 0.5).map(e => `${e.tagName}#${e.id}: ${e.getBoundingClientRect().right}`);"
        "return document.documentElement.scrollWidth > w ? [`page ${document.documentElement.scrollWidth} > ${w}`, ...wide] : wide;")


def test_the_page_runs_a_real_image_shows_the_card_and_the_apis_errors(browser, tmp_path, realsat):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as visible
    from selenium.webdriver.support.ui import WebDriverWait

    pixels = np.asarray(Image.open(realsat / "landsat8_grenada.png").convert("RGB"))[:120, :100]
    image = tmp_path / "grenada_crop.png"
    Image.fromarray(pixels).save(image)
    env = {"MODEL_URI": str(write_model(tmp_path / "models", seed=0))}
    if os.environ.get("HNDSR_UPDATE_SCREENSHOTS") and (REPO / "mlflow.db").is_file():  # the README's: the real model
        env = {"MODEL_URI": "models:/hndsr@production", "MLFLOW_TRACKING_URI": f"sqlite:///{REPO / 'mlflow.db'}"}
    s = Server(env, tmp_path)
    s.wait_ready()
    ARTIFACTS.mkdir(exist_ok=True)
    wait = WebDriverWait(browser, 60)
    try:
        browser.get(f"{s.url}/")
        assert "default-src 'self'" in httpx.get(f"{s.url}/").headers["content-security-policy"]
        wait.until(visible.visibility_of_element_located((By.ID, "card-facts")))
        card = browser.find_element(By.ID, "card").text
        assert "x2 to x4" in card and "default DDIM steps" in card
        if "MLFLOW_TRACKING_URI" not in env:
            assert "local" in card and "default DDIM steps\n2" in card and "No test metrics recorded" in card
        else:
            assert "production" in card and "gain over bicubic" in card
        # A real image at x2.5.
        browser.find_element(By.ID, "file").send_keys(str(image))
        number = browser.find_element(By.ID, "scale-number")
        number.send_keys(Keys.CONTROL, "a")
        number.send_keys("2.5", Keys.TAB)  # as a person would: select, type, leave the field
        browser.find_element(By.ID, "run").click()
        wait.until(visible.visibility_of_element_located((By.ID, "result")))
        width, height = hr_size(100, 2.5), hr_size(120, 2.5)
        natural = browser.execute_script(
            "const i = document.getElementById('after'); return [i.naturalWidth, i.naturalHeight];")
        assert natural == [width, height]
        assert f"{width}\u00d7{height} px at x2.5" in browser.find_element(By.ID, "result-facts").text
        assert browser.find_element(By.ID, "download").get_attribute("download") == "grenada_crop_x2.5.png"
        browser.save_screenshot(str(ARTIFACTS / "page.png"))
        if os.environ.get("HNDSR_UPDATE_SCREENSHOTS"):
            shutil.copy(ARTIFACTS / "page.png", REPO / "docs" / "page.png")
        # An API error, shown as the API words it.
        bad = tmp_path / "not-an-image.png"
        bad.write_text("this is text, not a PNG")
        expected = httpx.post(f"{s.url}/v1/super-resolve", files={"file": ("x.png", bad.read_bytes())},
                              data={"scale": "2.5"}).json()
        browser.find_element(By.ID, "file").send_keys(str(bad))
        browser.find_element(By.ID, "run").click()
        error = wait.until(visible.visibility_of_element_located((By.ID, "error")))
        assert expected["detail"] in error.text and expected["error"] in error.text
        # Readable at a phone's width: nothing wider than the screen.
        browser.set_window_size(390, 844)
        assert sideways(browser) == []
        browser.save_screenshot(str(ARTIFACTS / "page-phone.png"))
        logs = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
                and "/v1/super-resolve" not in entry["message"]]  # the error request is logged as a failed fetch
        assert logs == []  # no script error, nothing blocked by the page's policy
    finally:
        s.stop()


def test_a_geotiff_through_the_page_comes_back_as_a_geotiff_on_the_map_and_nothing_breaks(browser, tmp_path,
                                                                                             geotiff):
    """An 8-bit GeoTIFF (3 bands, nodata) through the page: by default the answer is a GeoTIFF with the input's
    CRS (not a PNG); no image box is shown (browsers cannot draw TIFF: no broken images, `hidden` really hides),
    nothing scrolls sideways at a phone's width; an error afterwards removes that result."""
    import rasterio
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as visible
    from selenium.webdriver.support.ui import WebDriverWait

    source = geotiff / "landsat7_rgb_byte_nodata.tif"
    crop = tmp_path / "landsat7_crop.tif"
    with rasterio.open(source) as src:
        window = rasterio.windows.Window(0, 0, 160, 120)
        profile = {**src.profile, "width": 160, "height": 120, "transform": src.window_transform(window)}
        with rasterio.open(crop, "w", **profile) as dst:
            dst.write(src.read(window=window))
        crs = src.crs
    s = Server({"MODEL_URI": str(write_model(tmp_path / "models", seed=0))}, tmp_path)
    s.wait_ready()
    ARTIFACTS.mkdir(exist_ok=True)
    wait = WebDriverWait(browser, 60)
    try:
        browser.set_window_size(390, 844)  # a phone
        browser.get(f"{s.url}/")
        wait.until(visible.visibility_of_element_located((By.ID, "card-facts")))
        browser.find_element(By.ID, "file").send_keys(str(crop))
        browser.find_element(By.ID, "run").click()
        wait.until(visible.visibility_of_element_located((By.ID, "result")))
        assert browser.find_element(By.ID, "download").get_attribute("download") == "landsat7_crop_x4.tif"
        for box in ("compare", "side-by-side", "slider-row"):
            assert not browser.find_element(By.ID, box).is_displayed(), box
        broken = browser.execute_script(
            "return [...document.images].filter(i => i.offsetParent !== null && !(i.complete && i.naturalWidth))"
            ".map(i => i.id);")
        assert broken == []
        assert sideways(browser) == []
        browser.execute_script("document.getElementById('result').scrollIntoView();")
        browser.save_screenshot(str(ARTIFACTS / "page-geotiff-phone.png"))
        # The download, as a person gets it: the file Chromium saves.
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        browser.find_element(By.ID, "download").click()
        saved = downloads / "landsat7_crop_x4.tif"
        WebDriverWait(browser, 30).until(lambda _: saved.is_file() and saved.stat().st_size > 0)
        with rasterio.open(saved) as answer:
            assert answer.crs == crs and answer.width == 640 and answer.height == 480 and answer.dtypes[0] == "uint8"
            assert answer.transform.a == profile["transform"].a / 4  # the pixel size divided by the scale
        # An error next: the old result goes, only the error is shown.
        bad = tmp_path / "not-an-image.png"
        bad.write_text("this is text, not a PNG")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        browser.find_element(By.ID, "run").click()
        wait.until(visible.visibility_of_element_located((By.ID, "error")))
        assert not browser.find_element(By.ID, "result").is_displayed()
        assert browser.find_element(By.ID, "download").get_attribute("href") is None
        browser.save_screenshot(str(ARTIFACTS / "page-error-after-result.png"))
    finally:
        s.stop()
