"""The `/ab` dashboard in a real headless Chromium (Debian's, driven by Playwright) against a running `t2i serve` on
the demo models: start a run of three encoders (the teacher, its int8 form, a student) over two prompts, wait for the
grid, check the 6 images, the summary table and the score-against-bytes chart, enlarge an image, cast a blind vote by
keyboard, and save screenshots as test artifacts."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.redis_server import free_port
from tests.stack import START_CAP_S, wait_for

CHROMIUM = os.environ.get("T2I_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("T2I_TEST_ARTIFACTS", "test-artifacts"))


@pytest.fixture(scope="module")
def served(models_file, tmp_path_factory):
    """`t2i serve` as a user runs it: embedded Redis, a worker and the API, in one supervisor process."""
    port = free_port()
    home = tmp_path_factory.mktemp("home")
    log = open(home / "serve.log", "w")
    env = {**os.environ, "T2I_MODELS_FILE": str(models_file), "T2I_HOME": str(home), "T2I_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port",
                                str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        if process.poll() is not None:
            raise RuntimeError((home / "serve.log").read_text())
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, START_CAP_S, "t2i serve to be ready", interval_s=0.3)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture()
def page():
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM) or Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM} (apt install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.requests, page.errors = requests, errors
        yield page
        browser.close()


def test_compare_two_encoders_then_vote(served, page):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.goto(f"{served}/ab")

    # 1. The form is filled from the API: prompt sets, pipelines, encoders with the teacher as reference.
    page.wait_for_selector("#encoders input[value='t5-base']")
    assert page.input_value("#reference") == "t5-xxl"
    # a route is offered as a column (labelled `route`, its rules on hover), never as the reference
    route = page.query_selector("#encoders label:has(input[value='auto'])")
    assert route is not None and "route" in route.inner_text() and "written-text" in route.get_attribute("title")
    assert page.query_selector("#reference option[value='auto']") is None
    page.select_option("#prompt-set", "")
    page.fill("#prompts", "a red fox in snow\na lighthouse at night")
    for box in page.query_selector_all("#encoders input"):
        box.set_checked(box.get_attribute("value") in ("t5-base", "t5-xxl", "t5-xxl-int8"))
    page.fill("#seeds", "3")
    page.click("#start")

    # 2. Progress, then the grid: 2 prompts x 3 encoders = 6 images, and one summary row per encoder.
    page.wait_for_selector("#run-status.done", timeout=120_000)
    images = page.query_selector_all("#grid img.cell-image")
    assert len(images) == 6
    page.wait_for_function("[...document.querySelectorAll('#grid img.cell-image')].every(i => i.naturalWidth > 0)")
    rows = {r.get_attribute("data-encoder"): r for r in page.query_selector_all("#summary tbody tr")}
    assert sorted(rows) == ["t5-base", "t5-xxl", "t5-xxl-int8"]
    base_row = [c.inner_text() for c in rows["t5-base"].query_selector_all("td")]
    assert base_row[0] == "t5-base" and float(base_row[3]) > 0 and 0 < float(base_row[4]) <= 1  # PSNR, SSIM
    assert base_row[-1] == "2 / 2"
    assert "reference" in rows["t5-xxl"].inner_text() and "int8-weight-only" in rows["t5-xxl-int8"].inner_text()

    # The chart: one mark per encoder at its real bytes (the int8 teacher a square, between the student and the
    # teacher), its score the SSIM against the reference (the reference at 1), and a frontier line.
    marks = {m.get_attribute("data-encoder"): m for m in page.query_selector_all("#frontier .point")}
    assert sorted(marks) == ["t5-base", "t5-xxl", "t5-xxl-int8"]
    size = {n: int(m.get_attribute("data-bytes")) for n, m in marks.items()}
    assert size["t5-base"] < size["t5-xxl-int8"] < size["t5-xxl"]
    assert marks["t5-xxl-int8"].evaluate("m => m.tagName") == "rect" and marks["t5-xxl"].evaluate("m => m.tagName") \
        == "circle"
    assert float(marks["t5-xxl"].get_attribute("data-score")) == 1.0
    assert 0 < float(marks["t5-base"].get_attribute("data-score")) < 1
    assert page.query_selector("#frontier polyline.frontier").get_attribute("points")
    assert "SSIM against t5-xxl" in page.inner_text("#frontier-caption")
    assert page.query_selector_all("#runs li[data-run]")
    page.screenshot(path=str(ARTIFACTS / "ab-grid.png"), full_page=True)

    # 3. Click to enlarge; Escape closes.
    images[0].click()
    assert page.is_visible("#lightbox")
    page.keyboard.press("Escape")
    assert not page.is_visible("#lightbox")

    # 4. The blind vote, by keyboard: a pair with no encoder names, then the next one.
    page.click("#tab-vote")
    page.wait_for_selector("#pair-left[src*='/pairs/']")
    assert "t5-" not in page.inner_text("#view-vote")
    first = page.get_attribute("#pair-left", "src")
    page.screenshot(path=str(ARTIFACTS / "ab-vote.png"), full_page=True)
    page.keyboard.press("ArrowLeft")
    page.wait_for_function(f"document.querySelector('#pair-left').src !== {first!r}")
    run_id = page.get_attribute("#runs li.active", "data-run")
    votes = httpx.get(f"{served}/v1/compare/{run_id}").json()["votes"]
    assert len(votes) == 1 and votes[0]["votes"] == 1

    # 5. Everything the page loaded came from the API itself (no CDN), and no script failed.
    assert all(url.startswith(served) or url.startswith("data:") for url in page.requests), page.requests
    assert page.errors == []
