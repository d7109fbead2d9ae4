"""The pages in a real browser: Debian's Chromium driven by Selenium through chromedriver, against the
service in embedded mode (``python -m api``: SQLite, the local runner) on 127.0.0.1.

Alice signs in, submits a digits magnitude job from the form and watches it finish live (the status and
the events change on the open page, from the event stream), opens its report, downloads an artifact
and checks its sha256, uploads and deletes a file, cancels a second job, reruns it and deletes it. Bob, another owner, sees
none of her jobs through any page or link. A screenshot of each page is saved in the test's tmp dir
(docs/web-*.png are copies). Skipped, saying so, where chromium or chromedriver is not installed
(``make install`` installs them on Debian)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.stack import free_port, process, wait_ready
from store import db, repo

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
    "`make install` does it on a Debian machine as root)",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

JOB_S = 300  # a digits job of 2 + 2 short epochs takes ~15 s; a busy 2-core machine may be slower


class Site:
    def __init__(self, base: str, keys: dict[str, str]) -> None:
        self.base, self.keys = base, keys


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """The service in embedded mode, with API keys for alice and bob."""
    state = tmp_path / "state"
    state.mkdir()
    url = f"sqlite:///{state / 'pruning.db'}"
    db.migrate(url)
    engine = db.make_engine(url)
    with db.session_scope(engine) as s:
        keys = {owner: repo.create_api_key(s, owner)[1] for owner in ("alice", "bob")}
    engine.dispose()
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "AUTH_DISABLED", "BOOTSTRAP_API_KEY")
    }
    env |= {"STATE_DIR": str(state), "DATABASE_URL": url, "PORT": str(port), "PYTHONUNBUFFERED": "1"}
    env |= {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    base = f"http://127.0.0.1:{port}"
    with process([sys.executable, "-m", "api"], env, tmp_path / "api.log") as api:
        wait_ready(base, api, tmp_path / "api.log")
        yield Site(base, keys)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        opts.add_argument(arg)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: CSP violations
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=opts)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := check():
                return value
        except StaleElementReferenceException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def sign_in(driver, site: Site, owner: str, shots: Path) -> None:
    driver.delete_all_cookies()
    driver.get(site.base + "/ui/jobs")
    assert driver.current_url.endswith("/ui/signin")
    if owner == "alice":
        driver.save_screenshot(str(shots / "signin.png"))
    driver.find_element(By.ID, "key").send_keys(site.keys[owner])
    driver.find_element(By.CSS_SELECTOR, "form.narrow button").click()
    wait_for(lambda: driver.current_url.endswith("/ui/jobs"), 20, "the jobs page")
    assert owner in driver.find_element(By.CLASS_NAME, "who").text


def submit_job(driver, site: Site, fields: dict[str, str], unchecked: tuple[str, ...] = ()) -> str:
    """Fill the submit form (text inputs and selects by name; checkboxes by id to untick); the new
    job's id."""
    driver.get(site.base + "/ui/submit")
    for name, value in fields.items():
        el = driver.find_element(By.NAME, name)
        if el.tag_name == "select":
            Select(el).select_by_value(value)
        else:
            el.clear()
            el.send_keys(value)
    for css in unchecked:
        box = driver.find_element(By.CSS_SELECTOR, css)
        if box.is_selected():
            box.click()
    driver.find_element(By.ID, "submit").click()
    wait_for(lambda: "/ui/jobs/" in driver.current_url, 30, "the new job's page")
    return driver.current_url.rsplit("/", 1)[1]


TINY = {
    "data.name": "digits",
    "method.name": "magnitude",
    "target.macs_ratio": "0.5",
    "schedule.dense_epochs": "2",
    "schedule.epochs": "2",
    "schedule.batch_size": "64",
    "schedule.max_steps_per_epoch": "5",
    "schedule.bn_recalibration_batches": "1",
}
ONLY_SAFETENSORS = tuple(
    f'input[name="export.formats"][value="{f}"]' for f in ("torch_export", "torchscript", "onnx")
) + ("#f-export-latency", "#f-export-tensorboard")


def watch_live(driver, timeout: float) -> tuple[set[str], int, int]:
    """On an open job page: the statuses its status element showed and its event rows at first and at
    most, until the page reloads itself (the job ended) or ``timeout``."""
    status, rows = driver.find_element(By.ID, "status"), driver.find_element(By.ID, "events")
    first = most = len(rows.find_elements(By.TAG_NAME, "tr"))
    seen = {status.text}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            seen.add(status.text)
            most = max(most, len(rows.find_elements(By.TAG_NAME, "tr")))
            time.sleep(0.1)
    except StaleElementReferenceException:  # the page reloaded: the job ended
        return seen, first, most
    raise AssertionError(f"the job page never saw its job end (statuses seen: {seen})")


def test_pages_in_a_real_browser(site: Site, browser, tmp_path: Path) -> None:
    d, shots = browser, tmp_path
    sign_in(d, site, "alice", shots)

    job = submit_job(d, site, TINY, ONLY_SAFETENSORS)
    seen, first, most = watch_live(d, JOB_S)
    assert seen & {"running", "succeeded"} and most > first, (seen, first, most)  # live, without a reload
    wait_for(lambda: d.find_element(By.ID, "status").text == "succeeded", 30, "succeeded after the reload")
    assert d.find_element(By.ID, "chart-top1").get_attribute("points")  # the chart, drawn by the server too
    assert "finetune epoch 2" in d.find_element(By.ID, "epoch-line").text
    d.save_screenshot(str(shots / "job.png"))

    # the report, inline (sandboxed iframe) and on its own
    assert d.find_element(By.ID, "report").get_attribute("sandbox") == ""
    d.get(d.find_element(By.ID, "report-link").get_attribute("href"))
    assert "magnitude" in d.page_source and "MACs" in d.page_source
    d.save_screenshot(str(shots / "report.png"))
    d.back()

    # an artifact, downloaded through its link, matches the sha256 the page lists
    rows = d.find_elements(By.CSS_SELECTOR, "#artifacts tbody tr")
    listed = {r.find_element(By.TAG_NAME, "a").text: r.find_element(By.CLASS_NAME, "sha").text for r in rows}
    assert "model.safetensors" in listed and "report.html" in listed, listed
    link = next(r.find_element(By.TAG_NAME, "a") for r in rows if r.text.startswith("model.safetensors"))
    artifact_url = link.get_attribute("href")
    link.click()
    path = d.downloads / "model.safetensors"
    wait_for(lambda: path.exists() and not list(d.downloads.glob("*.crdownload")), 60, "the download")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == listed["model.safetensors"]

    # a second job, cancelled from its page
    other = submit_job(d, site, {"data.name": "digits", "schedule.epochs": "50"}, ONLY_SAFETENSORS)
    d.find_element(By.ID, "cancel").click()
    wait_for(lambda: d.find_element(By.ID, "status").text == "cancelled", 120, "the cancelled job")
    assert "/ui/jobs/" + other in d.current_url

    # rerun it: a new job linked to the first (cancelled too, to keep the test short), then delete the first
    d.refresh()  # the ended job's buttons (the live update changes the status, not the actions)
    d.find_element(By.ID, "rerun").click()
    wait_for(lambda: other not in d.current_url, 30, "the rerun's page")
    third = d.current_url.rstrip("/").rsplit("/", 1)[-1]
    assert d.find_element(By.ID, "rerun-of").text == other  # linked to the job it reran
    wait_for(lambda: d.find_elements(By.ID, "cancel"), 30, "the rerun's cancel button")
    d.find_element(By.ID, "cancel").click()
    wait_for(lambda: d.find_element(By.ID, "status").text == "cancelled", 120, "the cancelled rerun")
    d.get(f"{site.base}/ui/jobs/{other}")
    d.find_element(By.ID, "delete").click()
    wait_for(lambda: other not in d.current_url, 30, "the list after the deletion")
    assert "/ui/jobs" in d.current_url
    assert other not in d.page_source and third in d.page_source
    d.get(f"{site.base}/ui/jobs/{other}")
    assert d.find_element(By.TAG_NAME, "h1").text == "404"
    other = third  # the cancelled job the checks below look for

    # the jobs list, filtered
    d.get(site.base + "/ui/jobs?method=magnitude")
    assert job in d.page_source and other in d.page_source
    d.get(site.base + "/ui/jobs?status=cancelled")
    assert job not in d.page_source and other in d.page_source
    d.get(site.base + "/ui/jobs")
    d.save_screenshot(str(shots / "jobs.png"))

    # uploads: a file from the form, listed, then deleted
    d.get(site.base + "/ui/uploads")
    weights = tmp_path / "net.safetensors"
    weights.write_bytes(path.read_bytes())
    d.find_element(By.NAME, "file").send_keys(str(weights))
    d.find_element(By.CSS_SELECTOR, "form.upload button").click()
    wait_for(lambda: "Uploaded." in d.page_source, 60, "the upload")
    assert len(d.find_elements(By.CSS_SELECTOR, "#uploads tbody tr form")) == 1
    d.save_screenshot(str(shots / "uploads.png"))
    d.find_element(By.CSS_SELECTOR, "#uploads tbody tr form button").click()
    wait_for(lambda: "The upload was deleted." in d.page_source, 30, "the deletion")

    # the submit form's errors, at their fields
    d.get(site.base + "/ui/submit")
    Select(d.find_element(By.NAME, "method.name")).select_by_value("s2h")
    assert d.find_element(By.ID, "options-s2h").is_displayed()
    assert not d.find_element(By.ID, "options-magnitude").is_displayed()
    d.find_element(By.NAME, "schedule.epochs").send_keys("-1")
    d.find_element(By.NAME, "target.macs_ratio").send_keys("1.5")
    d.find_element(By.ID, "submit").click()
    for field in ("schedule.epochs", "target.macs_ratio"):
        wait_for(
            lambda f=field: d.find_elements(By.CSS_SELECTOR, f'[data-field="{f}"] .field-error'), 20, field
        )
    assert d.find_element(By.ID, "options-s2h").is_displayed()  # the chosen method kept
    d.save_screenshot(str(shots / "submit.png"))

    # the pages ran under their CSP without a violation (no inline script or style anywhere)
    console = [e["message"] for e in d.get_log("browser")]
    assert not [m for m in console if "Content Security Policy" in m], console

    # bob sees none of alice's jobs, through any page or link
    sign_in(d, site, "bob", shots)
    assert job not in d.page_source and other not in d.page_source
    for path in (f"/ui/jobs/{job}", f"/ui/jobs/{job}/report", f"/ui/jobs/{other}"):
        d.get(site.base + path)
        assert d.find_element(By.TAG_NAME, "h1").text == "404", path
    d.get(artifact_url)
    assert d.find_element(By.TAG_NAME, "h1").text == "404"
    d.get(site.base + "/ui/jobs?status=succeeded")
    assert job not in d.page_source
    print(f"\nscreenshots in {shots}")
