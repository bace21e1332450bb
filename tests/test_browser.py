"""The app as a person sees it: the real server with tiny settings, driven in headless Chromium.

Needs Debian's `chromium` and `chromium-driver` and selenium (`.ci/run` installs them); skipped
with the reason where they are missing. Set DREAMLIFT_SCREENSHOT_DIR to keep the screenshots.
"""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from PIL import Image

from helpers import TINY_SETTINGS, free_port, stop_server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -r requirements.txt)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(not (CHROMIUM and DRIVER),
                       reason="Chromium and its driver are not installed (apt-get install chromium chromium-driver; "
                              ".ci/run does it)"),
    pytest.mark.browser, pytest.mark.server, pytest.mark.slow,
]
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1200",
                # A tab left for another one keeps running, as a person's would: without these, headless Chromium
                # sometimes froze the first tab of the two-tab test (its status stopped at the step it had shown).
                "--disable-background-timer-throttling", "--disable-backgrounding-occluded-windows",
                "--disable-renderer-backgrounding"]
WAIT = 120  # seconds any one awaited page state may take (a bound, not a timing)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from examples.build import build
    from helpers import tiny_run_config

    out = tmp_path_factory.mktemp("browser-outputs")
    examples = tmp_path_factory.mktemp("examples")
    build(["a red cube"], examples, tiny_run_config())  # a ready-made result, made as examples/build.py makes them
    with served_app(out, "browser-server.log", DREAMLIFT_EXAMPLES_DIR=str(examples)) as served:
        yield served


@contextlib.contextmanager
def served_app(out: Path, log_name: str, **env_extra):
    """app.py with the tiny settings on a free port, writing its runs to `out` and its log beside it; yields
    (url, out, log path) once the page answers, and stops the server after."""
    port = free_port()
    env = dict(os.environ, DREAMLIFT_OUTPUT_DIR=str(out), GRADIO_ANALYTICS_ENABLED="False", **env_extra)
    args = [sys.executable, "app.py", "--port", str(port)]
    for item in TINY_SETTINGS:
        args += ["--set", item]
    log_path = out.parent / log_name
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            _until(lambda: _answers(url) or proc.poll() is not None, "the app to start")
            assert proc.poll() is None, log_path.read_text()[-3000:]
            yield url, out, log_path
        finally:
            stop_server(proc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")  # 9 MB a run: under pytest's own, pruned, folder
    for flag in CHROME_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _until(condition, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"gave up after {timeout} s waiting for {what}")


def _shot(driver, name: str) -> None:
    folder = os.environ.get("DREAMLIFT_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


def _status(driver) -> str:
    """The status line's text, without the text of the progress tracker Gradio keeps inside it (at opacity 0)."""
    return driver.execute_script("""
        const e = document.getElementById('status');
        if (!e) { return ''; }
        return [...e.children].filter(c => c.dataset.testid !== 'status-tracker').map(c => c.innerText).join('\\n').trim();""")


def _open(driver, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea, #prompt input"))


def _type(driver, elem_id: str, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    box.clear()
    box.send_keys(text)


def _generate(driver, prompt: str, seed: str = "0") -> None:
    _type(driver, "prompt", prompt)
    _type(driver, "seed", seed)
    driver.find_element(By.CSS_SELECTOR, "#generate").click()


def _prompt(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#prompt textarea, #prompt input").get_attribute("value")


def _run_id(driver) -> str:
    return (parse_qs(urlparse(driver.current_url).query).get("run") or [""])[0]


def _status_and_progress_displays(driver) -> tuple[str, int]:
    """The status line and the number of progress bars and Gradio progress texts a person can see.

    Read in one script, so both come from the same state of the page: read one after the other, a
    stage that ended in between paired its last step's status with the next stage's page (no bar).
    """
    status, count = driver.execute_script("""
        const clear = e => { for (; e; e = e.parentElement) { if (getComputedStyle(e).opacity === "0") return true; } return false; };
        // (Gradio keeps a hidden event's tracker in the page at opacity 0: the page's timer ticks every few seconds.)
        const shown = e => e.offsetParent !== null && getComputedStyle(e).visibility !== "hidden" && !clear(e);
        const bars = [...document.querySelectorAll("progress, .progress-bar")].filter(shown);
        const texts = [...document.querySelectorAll(".progress-text, .eta-bar, .meta-text, .meta-text-center")]
            .filter(e => shown(e) && e.textContent.trim());
        const e = document.getElementById('status');
        return [e ? e.innerText : '', bars.length + texts.length];""")
    return status, count


@pytest.mark.parametrize("prompt, seed, expected", [
    ("a ceramic teapot", "0", "vocabulary"),
    ("", "0", "prompt is empty"),
    ("a red cube", "abc", "seed must be an integer"),
])
def test_bad_input_shows_a_visible_error_that_names_the_fix(app_url, browser, prompt, seed, expected):
    url, out, log_path = app_url
    _open(browser, url)
    before = sorted(out.iterdir())
    _generate(browser, prompt, seed)
    status = _until(lambda: "Error" in _status(browser) and _status(browser), f"an error for {prompt!r}")
    assert expected in status and browser.find_element(By.ID, "status").is_displayed(), status
    if expected == "vocabulary":
        assert "torus" in status  # the message lists what the prior knows
        _shot(browser, "error.png")
    assert sorted(out.iterdir()) == before  # nothing was started
    log = log_path.read_text()
    assert "Traceback" not in log and f"input refused: {status.split('Error: ')[-1][:40]}" in log  # one line


def test_a_tiny_run_shows_one_progress_display_then_the_model_and_its_downloads(app_url, browser):
    url, out, _ = app_url
    _open(browser, url)
    _generate(browser, "a red cube")
    samples = []  # (status, progress displays) while it ran

    def finished():
        status, displays = _status_and_progress_displays(browser)
        samples.append((status, displays))
        return status.startswith("Done")

    _until(finished, "the run to finish")
    running = [(s, n) for s, n in samples if " step " in s]
    assert running, f"no step was ever shown: {samples[:5]}"
    assert all(n == 1 for _, n in running), [x for x in running if x[1] != 1]  # one progress bar, no second progress text
    run_id = _run_id(browser)
    assert run_id and run_id in _status(browser) and str(out) not in _status(browser)  # the run id, not the server path

    def viewer_pixels():
        canvas = browser.find_elements(By.CSS_SELECTOR, "#viewer canvas")
        if not canvas:
            return None
        image = Image.open(io.BytesIO(canvas[0].screenshot_as_png)).convert("RGB")
        changed = sum(1 for p in image.getdata() if min(p) < 200)  # not the white background
        return changed / (image.width * image.height) > 0.02 and image

    image = _until(viewer_pixels, "the model to appear in the viewer")
    assert image.width > 200
    _shot(browser, "finished.png")

    links = {a.get_attribute("download"): a.get_attribute("href")
             for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a.download-link")}
    assert sorted(links) == ["model.glb", "model.zip"], links
    glb = httpx.get(links["model.glb"], timeout=30)
    assert glb.status_code == 200 and glb.content[:4] == b"glTF"
    archive = httpx.get(links["model.zip"], timeout=30)
    assert archive.status_code == 200
    with zipfile.ZipFile(io.BytesIO(archive.content)) as z:
        assert sorted(z.namelist()) == ["model.mtl", "model.obj", "texture_kd.png"]
    assert not [b for b in browser.find_elements(By.CSS_SELECTOR, "#downloads button") if b.is_displayed()]
    assert browser.find_element(By.CSS_SELECTOR, "#generate").text == "Generate"
    video = _until(lambda: browser.find_elements(By.CSS_SELECTOR, "#turntable video[src]"), "the turntable video")
    assert httpx.get(video[0].get_attribute("src"), timeout=30).status_code == 200
    recent = _until(lambda: browser.find_elements(By.CSS_SELECTOR, f"#server a[href*='run={run_id}']"), "the recent runs")
    assert recent[0].text == "a red cube"
    # The list is refreshed by the page's timer (every 3 s): the run shows as finished at its next tick.
    _until(lambda: "a red cube · finished" in browser.find_element(By.ID, "server").text, "the run listed as finished")


def test_a_reload_mid_run_finds_the_run_and_it_finishes(app_url, browser):
    url, out, _ = app_url
    _open(browser, url)
    browser.find_element(By.CSS_SELECTOR, "#advanced .label-wrap").click()
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.CSS_SELECTOR, "#coarse-steps input[type=number]").is_displayed())
    steps = browser.find_element(By.CSS_SELECTOR, "#coarse-steps input[type=number]")
    steps.clear()
    steps.send_keys("60", Keys.TAB)  # long enough to reload while it trains
    _generate(browser, "a blue torus", seed="7")
    _until(lambda: " step " in _status(browser) and _run_id(browser), "the run to start training")
    run_id = _run_id(browser)
    assert not _status(browser).startswith("Done")
    assert browser.find_element(By.CSS_SELECTOR, "#generate").text != "Generate"  # the button shows a run is going
    browser.refresh()
    _until(lambda: " step " in _status(browser) or run_id in _status(browser), "the reloaded page to show the run")

    def ended():
        status = _status(browser)
        return any(word in status for word in ("Done", "Cancelled", "Error")) and status

    status = ended() or _until(ended, "the run to end")
    assert status.startswith("Done") and run_id in status, status
    record = json.loads((out / run_id / "run.json").read_text())
    assert record["status"] == "finished" and record["config"]["coarse"]["iters"] == 60 and record["seed"] == 7
    assert _run_id(browser) == run_id
    assert _prompt(browser) == "a blue torus"  # the reopened run fills the prompt box


def test_cancel_with_no_run_going_says_so_and_an_unknown_run_id_is_named(app_url, browser):
    url, _, _ = app_url
    _open(browser, url)
    browser.find_element(By.CSS_SELECTOR, "#cancel").click()
    status = _until(lambda: "cancel" in _status(browser).lower() and _status(browser), "the Cancel button's answer")
    assert status.startswith("Nothing to cancel"), status
    _open(browser, url + "?run=20990101-000000-no-such-run")
    status = _until(lambda: "No run" in _status(browser) and _status(browser), "the unknown run to be named")
    assert "20990101-000000-no-such-run" in status


def test_an_example_shows_its_ready_made_model_at_once(app_url, browser):
    url, out, _ = app_url
    _open(browser, url)
    before = sorted(out.iterdir())
    sample = next(b for b in browser.find_elements(By.CSS_SELECTOR, "#examples button") if b.text == "a red cube")
    start = time.monotonic()
    sample.click()
    _until(lambda: "Ready-made result" in _status(browser), f"the example's status (shown: {_status(browser)!r})", timeout=20)
    status_seconds = time.monotonic() - start
    canvas = _until(lambda: browser.find_elements(By.CSS_SELECTOR, "#viewer canvas"), "the viewer", timeout=20)

    def drawn():
        image = Image.open(io.BytesIO(canvas[0].screenshot_as_png)).convert("RGB")
        return sum(1 for p in image.getdata() if min(p) < 200) / (image.width * image.height) > 0.01

    _until(drawn, "the example's model in the viewer", timeout=20)
    seconds = time.monotonic() - start
    print(f"example click to its status: {status_seconds:.2f} s, to its model drawn in the viewer: {seconds:.2f} s")
    assert status_seconds < 2.0, status_seconds
    assert seconds < 5.0, seconds  # the viewer's WebGL in software Chromium, on 2 shared cores
    status = _status(browser)
    assert "quick preset" in status and "seed 0" in status and "Generate" in status, status
    assert _prompt(browser) == "a red cube" and not _run_id(browser)
    assert browser.find_elements(By.CSS_SELECTOR, "#turntable video[src]")
    assert {a.get_attribute("download") for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a.download-link")} \
        >= {"model.glb"}
    _shot(browser, "example.png")
    assert sorted(out.iterdir()) == before  # nothing ran


def test_the_visitors_text_shows_as_text_in_the_error_line(app_url, browser):
    url, _, _ = app_url
    _open(browser, url)
    prompt = '<img src=x id=injected> <script>window.hit=1</script> *bold*'
    _generate(browser, prompt)
    status = _until(lambda: "Error" in _status(browser) and _status(browser), "the error line")
    assert "<img src=x id=injected>" in status and "<script>window.hit=1</script>" in status and "*bold*" in status
    assert not browser.find_elements(By.CSS_SELECTOR, "#status img, #injected")
    assert not browser.find_elements(By.CSS_SELECTOR, "#status script")


def test_a_second_tab_sees_the_device_busy_its_place_in_line_and_a_cancel_that_removes_it(app_url, browser):
    url, _, _ = app_url
    _open(browser, url)
    browser.find_element(By.CSS_SELECTOR, "#advanced .label-wrap").click()
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.CSS_SELECTOR, "#coarse-steps input[type=number]").is_displayed())
    steps = browser.find_element(By.CSS_SELECTOR, "#coarse-steps input[type=number]")
    steps.clear()
    steps.send_keys("3000", Keys.TAB)  # holds the device while the second tab looks
    _generate(browser, "a green sphere", seed="11")
    _until(lambda: " step " in _status(browser) and _run_id(browser), "the first tab's run to train")
    first_tab = browser.current_window_handle
    browser.switch_to.new_window("tab")
    try:
        _open(browser, url)
        busy = _until(lambda: "busy" in _status(browser) and _status(browser), "a fresh page to say the device is busy")
        assert not busy.startswith("Ready") and "1 run going" in busy, busy
        _shot(browser, "busy.png")
        _generate(browser, "a yellow cone", seed="12")
        place = _until(lambda: "in line" in _status(browser) and _status(browser), "the queued page's place")
        assert place.startswith("1st in line") and "1 running" in place, place
        _shot(browser, "queued.png")
        browser.find_element(By.CSS_SELECTOR, "#cancel").click()
        removed = _until(lambda: "Removed from the queue" in _status(browser) and _status(browser), "the cancel's answer")
        assert "nothing was made" in removed
    finally:
        browser.close()
        browser.switch_to.window(first_tab)
    browser.find_element(By.CSS_SELECTOR, "#cancel").click()
    try:
        _until(lambda: "Cancelled" in _status(browser), "the first run to stop")
    except AssertionError as exc:  # say what the page showed instead
        _shot(browser, "first-tab-cancel.png")
        run_id = browser.execute_script("const e = document.querySelector('#run-id textarea, #run-id input'); "
                                        "return e && e.value;")
        raise AssertionError(f"{exc}; the status line says {_status(browser)!r}, run id {run_id!r}") from None
