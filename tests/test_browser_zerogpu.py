"""The page on a ZeroGPU Space, in headless Chromium: the stand-in host of tests/zerogpu forks a GPU call per
stage, as Hugging Face's does. The preset menu shows each preset's GPU time, a run finishes with the model in
the viewer and both downloads, and a cancel mid-run says where it stopped. Needs what tests/test_browser.py
needs (skipped with the reason where it is missing); set DREAMLIFT_SCREENSHOT_DIR to keep the screenshots."""
import io
import json
import os
import time

import pytest
from PIL import Image

from helpers import ROOT
from test_browser import (  # noqa: F401 - the module's skip (no Chromium) applies here too
    _generate,
    _open,
    _run_id,
    _shot,
    _status,
    _until,
    browser,
    pytestmark,
    served_app,
)

By = pytest.importorskip("selenium.webdriver.common.by").By
STANDIN = ROOT / "tests" / "zerogpu"


@pytest.fixture(scope="module")
def zerogpu_url(tmp_path_factory):
    out = tmp_path_factory.mktemp("zerogpu-outputs")
    with served_app(out, "zerogpu-server.log", SPACES_ZERO_GPU="true",
                    PYTHONPATH=os.pathsep.join([str(STANDIN), str(ROOT)]), ZEROGPU_STANDIN_TIME_SCALE="20",
                    ZEROGPU_STANDIN_LOG=str(out.parent / "zerogpu-requests.jsonl")) as served:
        yield served


def _viewer_shows_a_model(driver):
    canvas = driver.find_elements(By.CSS_SELECTOR, "#viewer canvas")
    if not canvas:
        return None
    image = Image.open(io.BytesIO(canvas[0].screenshot_as_png)).convert("RGB")
    changed = sum(1 for p in image.getdata() if min(p) < 200)  # not the white background
    return changed / (image.width * image.height) > 0.02


def test_a_run_on_a_zerogpu_space_finishes_in_the_page_and_a_cancel_stops_the_next(zerogpu_url, browser):  # noqa: F811
    url, out, log_path = zerogpu_url
    _open(browser, url)
    shown = _until(lambda: browser.execute_script("const e = document.querySelector('#preset input'); "
                                                  "return e && e.value;"), "the preset menu")
    assert shown.startswith("fast (~") and shown.endswith(" GPU)"), shown  # the default, with its GPU time
    _generate(browser, "a red cube")
    _until(lambda: _status(browser).startswith("Done"), "the run to finish")
    _until(lambda: _viewer_shows_a_model(browser), "the model to appear in the viewer")
    _shot(browser, "zerogpu-finished.png")
    links = sorted(a.get_attribute("download") for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a.download-link"))
    assert links == ["model.glb", "model.zip"], links
    record = json.loads((out / _run_id(browser) / "run.json").read_text())
    assert record["status"] == "finished" and record["stage_calls"] == 2
    calls = [json.loads(line) for line in (out.parent / "zerogpu-requests.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and all(0 < c["seconds"] <= 300 for c in calls)

    # A longer run, cancelled in its coarse stage: the worker process stops, and the page says where.
    browser.find_element(By.CSS_SELECTOR, "#advanced .label-wrap").click()
    steps = _until(lambda: [e for e in browser.find_elements(By.CSS_SELECTOR, "#coarse-steps input[type=number]")
                            if e.is_displayed()], "the advanced settings to open")[0]
    steps.clear()
    steps.send_keys("3000")
    _generate(browser, "a blue sphere")
    _until(lambda: " step " in _status(browser) and "Coarse" in _status(browser), "the coarse stage to report a step")
    asked = time.monotonic()
    browser.find_element(By.CSS_SELECTOR, "#cancel").click()
    _until(lambda: _status(browser).startswith("Cancelled"), "the page to say the run was cancelled", timeout=30)
    assert time.monotonic() - asked < 15
    _shot(browser, "zerogpu-cancelled.png")
    cancelled = out / _run_id(browser)
    assert json.loads((cancelled / "run.json").read_text())["status"] == "cancelled"
