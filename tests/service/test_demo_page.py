"""The demo page in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by
Selenium) loads ``GET /`` from a real ``python -m service`` on the shipped checkpoint, uploads an example image,
and the masks it draws are read back from the canvas and compared with the answer's RLEs pixel by pixel.

Set ``DEMO_SCREENSHOT=docs/demo.png`` to also write the screenshot where the README shows it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tests.deploy.support import require_executable
from tests.live_service import REPO_ROOT, running_service

pytestmark = [pytest.mark.slow, pytest.mark.integration]

EXAMPLE = REPO_ROOT / "examples" / "shapes-1.png"
CONCEPTS = "red circle, blue star, green heart"
INSTALL_HINT = "apt-get install chromium chromium-driver"
WAIT_S = 60


@pytest.fixture(scope="module")
def service_url(tmp_path_factory) -> str:
    with running_service(tmp_path_factory.mktemp("demo") / "service.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    chromium = require_executable("chromium", INSTALL_HINT, required_in_ci=True)
    chromedriver = require_executable("chromedriver", INSTALL_HINT, required_in_ci=True)
    # Never let Selenium Manager look for (or download) a browser or driver: both are given.
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,880", "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(browser, url: str) -> None:
    browser.get(f"{url}/")
    assert browser.title.startswith("zutis-service"), browser.page_source[:500]


def submit(browser, concepts: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "image").send_keys(str(EXAMPLE))
    # The photo is drawn as soon as the file is chosen (the placeholder goes away).
    WebDriverWait(browser, WAIT_S).until(
        lambda b: "empty" not in b.find_element(By.ID, "viewer").get_attribute("class"))
    field = browser.find_element(By.ID, "concepts")
    field.clear()
    if concepts:
        field.send_keys(concepts)
    browser.find_element(By.ID, "submit").click()
    # Done when the button is enabled again, i.e. the answer (or the error) has been handled.
    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.find_element(By.ID, "submit").is_enabled() and b.find_element(By.ID, "json").get_attribute(
            "textContent"))


def canvas_rgba(browser, canvas_id: str) -> np.ndarray:
    """The pixels of a canvas of the page, (H, W, 4) uint8, read back through a PNG data URL."""
    url = browser.execute_script(f"return document.getElementById('{canvas_id}').toDataURL('image/png');")
    header, data = url.split(",", 1)
    assert header == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGBA"))


def test_demo_page_draws_the_masks_of_the_answer(browser, service_url, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_page(browser, service_url)
    submit(browser, CONCEPTS)
    assert not browser.find_element(By.ID, "error").is_displayed()
    answer = json.loads(browser.find_element(By.ID, "json").get_attribute("textContent"))

    # The page sent what was typed: the same request made directly gets the same answer (the model is deterministic).
    direct = httpx.post(f"{service_url}/segment", files={"image": EXAMPLE.open("rb")},
                        data={"concepts": CONCEPTS}, timeout=WAIT_S).json()
    assert answer["concepts"] == ["background", "red circle", "blue star", "green heart"]
    assert answer["instances"] == direct["instances"]
    instances = answer["instances"]
    assert len(instances) >= 2, "the example should give a few instances to draw"

    rows = browser.find_elements(By.CSS_SELECTOR, "#instances tbody tr")
    assert [row.find_elements(By.TAG_NAME, "td")[1].text for row in rows] == [i["concept"] for i in instances]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#labels span")) == len(instances)
    colours = [tuple(int(v) for v in row.get_attribute("data-rgb").split(",")) for row in rows]
    assert len(set(colours)) == len(colours), "each instance has its own colour"

    # Every pixel of every RLE is painted, nothing else is, and each pixel has the colour of the highest-scoring
    # instance covering it (the list is sorted by score; the best is drawn on top).
    masks = mask_utils.decode([i["segmentation"] for i in instances]).transpose(2, 0, 1).astype(bool)
    drawn = canvas_rgba(browser, "masks")
    assert drawn.shape[:2] == masks.shape[1:] == (answer["image"]["height"], answer["image"]["width"])
    union = masks.any(axis=0)
    assert np.array_equal(drawn[..., 3] == 255, union) and not drawn[..., 3][~union].any()
    owner = np.argmax(masks, axis=0)
    expected_rgb = np.array(colours, dtype=np.uint8)[owner]
    assert np.array_equal(drawn[..., :3][union], expected_rgb[union])

    # The picture of the README: instance masks and the raw JSON open.
    browser.find_element(By.CSS_SELECTOR, "#raw summary").click()
    screenshot = tmp_path / "demo.png"
    assert browser.save_screenshot(str(screenshot))
    assert Image.open(screenshot).width == 1400
    if os.environ.get("DEMO_SCREENSHOT"):
        shutil.copyfile(screenshot, Path(os.environ["DEMO_SCREENSHOT"]))

    # Hovering a row of the list highlights exactly that instance's mask.
    ActionChains(browser).move_to_element(rows[1]).perform()
    assert "dim" in browser.find_element(By.ID, "masks").get_attribute("class")
    assert np.array_equal(canvas_rgba(browser, "highlight")[..., 3] == 255, masks[1])
    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()

    # The semantic map: every concept index of the answer's PNG gets its colour, background stays transparent.
    browser.find_element(By.ID, "show-semantic").click()
    semantic = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["semantic"]["png"]))))
    painted = canvas_rgba(browser, "semantic")
    assert np.array_equal(painted[..., 3] == 255, semantic > 0)
    legend = [item.text for item in browser.find_elements(By.CSS_SELECTOR, "#legend li")]
    assert legend == [answer["concepts"][c] for c in sorted(set(semantic[semantic > 0].tolist()))]



def test_demo_page_sliders_start_at_the_checkpoints_defaults(browser, service_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    defaults = httpx.get(f"{service_url}/demo/defaults.json").json()
    info = httpx.get(f"{service_url}/info").json()["inference_defaults"]
    assert defaults["score_threshold"] == info["score_threshold"] == 0.6  # the shipped checkpoint's
    open_page(browser, service_url)
    slider = browser.find_element(By.ID, "score-threshold")
    WebDriverWait(browser, WAIT_S).until(lambda b: slider.is_enabled())
    assert float(slider.get_attribute("value")) == defaults["score_threshold"]
    assert float(browser.find_element(By.ID, "mask-threshold").get_attribute("value")) == defaults["mask_threshold"]
    assert browser.find_element(By.ID, "score-threshold-value").text == "model default (0.60)"


def test_demo_page_shows_an_error_answer_as_a_sentence(browser, service_url):
    from selenium.webdriver.common.by import By

    open_page(browser, service_url)
    submit(browser, "")
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    assert "no concepts given" in error.text and "HTTP 422, invalid_request" in error.text, error.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#instances tbody tr")
