"""The web app (`python -m eval.app`, the `[app]` extra): its maps are `eval.predict`'s, and in a
real headless Chromium (the distribution's `chromium` + `chromium-driver`, driven by Selenium)
an upload runs through every stage, bad inputs get an error on the page while the server keeps
serving, and two requests at once both complete. The screenshot goes to test-artifacts/."""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")

import eval.predict
from clipsam_jax.app import server
from clipsam_jax.app.analyzer import AppConfig, AppInputError

ARTIFACTS = Path(os.environ.get("CLIPSAM_TEST_ARTIFACTS", "test-artifacts"))
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs chromium and chromium-driver (.ci/install-browser installs them)",
)


@pytest.fixture(scope="module")
def app():
    running = server.start(AppConfig(port=0), demo=True, quiet=True)
    yield running
    running.close()
    assert not running.work.exists()  # the work folder goes with the app


def _example(app, index: int = 0) -> tuple[Path, str]:
    path, name = app.examples[index]
    return Path(path), name


def _predict_map(app, image: Path, class_name: str, output: Path, *extra: str) -> np.ndarray:
    """`eval.predict`'s map of `image` with the app's settings."""
    config = app.analyzer.config
    eval.predict.main([
        str(image), "--output", str(output), "--class-name", class_name, "--no-umci",
        "--clip", config.clip.model, "--image-size", str(config.clip.image_size),
        "--sam", config.refine.sam, "--no-progress", *extra,
    ])  # fmt: skip
    (map_file,) = output.glob("*_map.png")
    return np.asarray(Image.open(map_file))


def test_the_apps_map_is_eval_predicts(app, tmp_path):
    image, name = _example(app)
    result = app.analyzer.inspect(image, name, 0.4, 3)
    ours = np.asarray(Image.open(result.files["map"]))
    want = _predict_map(app, image, name, tmp_path / "predict", "--threshold", "0.4",
                        "--points", "3")  # fmt: skip
    np.testing.assert_array_equal(ours, want)
    assert result.boxes > 0 and result.panel.shape[0] > 200  # SAM acted; the panel drawn
    assert set(result.seconds) >= {"rough map (reading, CLIP, head)", "of which SAM", "total"}


def test_served_on_loopback_with_an_upload_cap(app):
    assert app.url.startswith("http://127.0.0.1:")
    assert app.page.max_file_size == AppConfig().max_upload_mb * 1024 * 1024
    assert str(app.work) in os.environ["GRADIO_TEMP_DIR"]  # uploads land in the work folder


def test_requests_the_app_refuses(app, tmp_path):
    image, name = _example(app)
    text = tmp_path / "notes.png"
    text.write_text("a text file renamed .png")
    for args, message in (
        ((text, name), "notes.png is not an image the app can read"),
        ((image, "  "), "Type the part's name"),
        ((None, name), "Upload an image of the part"),
    ):
        with pytest.raises(AppInputError, match=message):
            app.analyzer.inspect(*args, 0.47, 5)


def test_a_zip_of_images_gives_predict_outputs(app, tmp_path):
    archive = tmp_path / "parts.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for i, (path, _) in enumerate(app.examples[:2]):
            zipped.write(path, f"line{i}/{Path(path).name}")
        zipped.writestr("../../escape.png", Image.new("RGB", (8, 8)).tobytes())  # not an image
        zipped.writestr("readme.txt", "not an image")
    result = app.analyzer.inspect_batch([archive], "screw", 0.47, 5)
    assert result.images == 2 and len(result.skipped) == 1  # the fake PNG is reported
    with zipfile.ZipFile(result.archive) as out:
        names = out.namelist()
    assert "predictions.csv" in names and sum(n.endswith("_map.png") for n in names) == 2
    assert not (tmp_path.parent / "escape.png").exists()


# ----------------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1500,1250"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(condition, timeout: float = 120.0, what: str = ""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _run_in_page(driver, app, image: Path, class_name: str) -> None:
    """Open the page, upload `image`, type `class_name`, press the button."""
    from selenium.webdriver.common.by import By

    driver.get(app.url)
    upload = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#image-input input[type=file]"),
                   60, "the page")  # fmt: skip
    upload[0].send_keys(str(image))
    _wait(lambda: image.stem in driver.find_element(By.ID, "image-input").text, 30, "the upload")
    box = driver.find_element(By.CSS_SELECTOR, "#class-name textarea, #class-name input")
    box.clear()
    box.send_keys(class_name)
    driver.find_element(By.ID, "run").click()


def _page_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


@needs_browser
def test_inspect_an_image_in_the_browser(app, browser, tmp_path):
    from selenium.webdriver.common.by import By

    image, name = _example(app)
    _run_in_page(browser, app, image, name)
    stages = _wait(lambda: [e for e in browser.find_elements(By.CSS_SELECTOR, "#stages img")
                            if e.get_attribute("src")], what="the stages image")  # fmt: skip
    _wait(lambda: "Image score" in _page_text(browser), what="the summary")
    link = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#map-file a[href]"),
                 what="the map's download link")  # fmt: skip
    shown = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(
        stages[0].get_attribute("src")).read())))  # fmt: skip
    downloaded = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(
        link[0].get_attribute("href")).read())))  # fmt: skip
    # The page's map is eval.predict's for the same image and settings (the page's defaults).
    np.testing.assert_array_equal(downloaded, _predict_map(app, image, name, tmp_path / "p"))
    assert shown.shape[:2] == (2 * 278, 3 * 256 + 64)  # six stages in two rows, the colour bar
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "app.png"))


@needs_browser
def test_bad_inputs_get_an_error_on_the_page_and_the_server_keeps_serving(app, browser, tmp_path):
    from selenium.webdriver.common.by import By

    image, name = _example(app)
    text = tmp_path / "not_an_image.png"
    text.write_text("a text file renamed .png")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (6000, 4000), (90, 90, 90)).save(huge)
    for upload, class_name, message in (
        (text, name, "not_an_image.png is not an image the app can read"),
        (image, "", "Type the part's name"),
        (huge, name, "huge.png is 6000×4000 = 24.0 megapixels"),
    ):
        _run_in_page(browser, app, upload, class_name)
        _wait(lambda message=message: message in _page_text(browser), 60, message)
    # The next request is served as usual.
    _run_in_page(browser, app, image, name)
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#map-file a[href]"), what="a result")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "app_after_errors.png"))


def test_two_requests_at_once_both_complete(app):
    from gradio_client import Client, handle_file

    results, errors = {}, []

    def call(index: int) -> None:
        try:
            image, name = _example(app, index)
            client = Client(app.url, verbose=False)
            results[index] = client.predict(handle_file(str(image)), name, 0.47, 5, False, [],
                                            "png", api_name="/inspect")  # fmt: skip
        except Exception as error:  # reported below, with the other thread's outcome
            errors.append(error)

    threads = [threading.Thread(target=call, args=(i,)) for i in (0, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and set(results) == {0, 2}
    for _panel, summary, map_file, _mask in results.values():
        assert "Image score" in summary and Path(map_file).name.endswith("_map.png")
