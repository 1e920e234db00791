"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver,
driven by selenium; `scripts/ensure-chromium.sh` installs them): the overview and
the page of a RUNNING job whose log grows live, then a kill through the page's
confirm() dialog. Screenshots go to the test's tmp_path.

Selenium blocks: every browser step runs in a thread (deferToThread) so that the
reactor keeps serving the worker meanwhile."""

from __future__ import annotations

import json
import shutil
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

from fluster_worker.jobs.model import JobState
from fluster_worker.testing.dashboard import FakeWorker, make_record
from fluster_worker.web.app import build_resource
from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import Harness, entrypoint, make_bundle, until
from tests.test_dashboard import start_recovered_worker

pytestmark = pytest.mark.docker

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
)
T = TypeVar("T")


def tick(period: float, count: int) -> int:
    """The job: a line every ``period`` seconds, for a while."""
    for i in range(count):
        print(f"tick {i} <b>not bold</b>", flush=True)
        time.sleep(period)
    return count


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    for binary in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(binary) is None:
            pytest.fail(f"{binary} is missing: run scripts/ensure-chromium.sh")
    options = Options()
    options.binary_location = CHROMIUM  # never let selenium-manager look for (or fetch) a browser
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(60)
    yield browser
    browser.quit()


@pytest_twisted.async_yield_fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_recovered_worker(tmp_path)
    yield h
    await h.worker.stopService()


async def in_thread(f: Callable[..., T], *args: Any) -> T:
    return await deferToThread(f, *args)


def wait_for(browser: Any, condition: Callable[[Any], Any], timeout: float, what: str) -> Any:
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
        WebDriverException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d: Any) -> Any:
        try:
            return condition(d)
        except WebDriverException as e:
            # A node of the page being replaced, seen by chromedriver's inspector.
            if "does not belong to the document" in str(e.msg):
                return False
            raise

    # Elements of a page being replaced go stale or missing for a moment: poll on.
    ignored = (NoSuchElementException, StaleElementReferenceException)
    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(check)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


def check_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 600, (width, height)
    assert len(data) > 20_000, f"{path} is suspiciously small ({len(data)} bytes)"
    return width, height


def console_problems(browser: Any) -> list[str]:
    """Severe console entries (CSP violations, failed loads, script errors)."""
    return [e["message"] for e in browser.get_log("browser") if e.get("level") == "SEVERE"
            and "favicon.ico" not in e["message"]]


@pytest_twisted.ensureDeferred
async def test_live_job_page_in_chromium(harness: Harness, driver: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    job_id = f"live-{uuid.uuid4().hex[:8]}"
    await harness.client.run_job(pb.RunJobRequest(
        job_id=job_id,
        serialized_entrypoint=entrypoint(tick, 0.2, 1500),
        bundle_gcs_path=f"file://{make_bundle(tmp_path / 'bundle')}",
    ))
    await harness.wait_state(job_id, {pb.JOB_STATE_RUNNING})

    async def first_lines() -> bool:
        response = await treq.get(f"{harness.url}/api/v1/jobs/{job_id}/logs?tail=5&source=stdout")
        body = json.loads(await response.text("utf-8"))
        return len(body["lines"]) >= 3

    await until(first_lines, 60, "the job's first lines")

    # The overview: the job is listed as running, with a link to its page.
    def overview() -> str:
        driver.get(harness.url + "/")
        link = wait_for(driver, EC.presence_of_element_located((By.LINK_TEXT, job_id)), 10, "the job's row")
        row = link.find_element(By.XPATH, "./ancestor::tr")
        assert "running" in row.text
        assert driver.find_element(By.CSS_SELECTOR, ".card").text.strip()
        driver.save_screenshot(str(tmp_path / "overview.png"))
        return str(link.get_attribute("href"))

    href = await in_thread(overview)
    assert href.endswith(f"/job/{job_id}")
    check_png(tmp_path / "overview.png")

    # The job page: server-rendered lines first, then new ones appear live.
    def follow() -> tuple[int, int, str]:
        driver.get(href)
        assert driver.find_element(By.ID, "job-state").text == "running"
        wait_for(driver, lambda d: d.find_element(By.ID, "follow-status").text == "following live", 10,
                 "the live follow to start")

        def last_seq(d: Any) -> int:
            lines = d.find_elements(By.CSS_SELECTOR, "#log .line")
            return int(lines[-1].get_attribute("data-seq")) if lines else -1

        rendered = last_seq(driver)
        assert rendered >= 2, "the server-rendered tail is missing"
        # At 5 lines a second, several new lines arrive within a few polls.
        wait_for(driver, lambda d: last_seq(d) >= rendered + 5, 30, "new log lines to appear live")
        newest = driver.find_elements(By.CSS_SELECTOR, "#log .line")[-1]
        text = newest.find_element(By.CSS_SELECTOR, ".text").text
        assert newest.find_elements(By.TAG_NAME, "b") == []  # appended as text, never as HTML
        driver.save_screenshot(str(tmp_path / "job.png"))
        return rendered, last_seq(driver), text

    rendered, followed, text = await in_thread(follow)
    assert followed > rendered
    assert text.startswith("tick ") and "<b>not bold</b>" in text
    check_png(tmp_path / "job.png")
    assert await in_thread(console_problems, driver) == []  # the CSP allows all the page needs

    # Kill through the page: the button asks with confirm(), then the job dies.
    def kill() -> None:
        driver.find_element(By.CSS_SELECTOR, "form.kill button").click()
        alert = wait_for(driver, EC.alert_is_present(), 5, "the confirm() dialog")
        assert job_id in alert.text
        alert.accept()
        wait_for(driver, lambda d: d.find_element(By.ID, "job-state").text == "killed", 30,
                 "the page to show the job killed")
        assert driver.find_elements(By.CSS_SELECTOR, "form.kill") == []
        driver.save_screenshot(str(tmp_path / "killed.png"))

    await in_thread(kill)
    status = await harness.client.status(job_id)
    assert status.state == pb.JOB_STATE_KILLED
    check_png(tmp_path / "killed.png")


# -- the same pages over fakes: the follow's end, and the pages without JavaScript ------


@pytest_twisted.async_yield_fixture
async def fake_site() -> AsyncIterator[tuple[FakeWorker, str]]:
    from twisted.internet import reactor as the_reactor
    from twisted.web.server import Site

    reactor: Any = the_reactor
    worker = FakeWorker()
    worker.manager.add(make_record("job-live", JobState.RUNNING, ports={"http": 30001}))
    worker.manager.add(make_record("job-done", JobState.SUCCEEDED, from_cache=True))
    for i in range(40):
        worker.logs.add("job-live", "stdout" if i % 3 else "stderr", f"line {i}")
    port = reactor.listenTCP(0, Site(build_resource(worker)), interface="127.0.0.1")
    yield worker, f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_follow_stops_when_the_job_ends(fake_site: tuple[FakeWorker, str], driver: Any) -> None:
    from selenium.webdriver.common.by import By
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    worker, url = fake_site
    counter = iter(range(1000, 10**6))
    writer = LoopingCall(lambda: worker.logs.add("job-live", "stdout", f"live {next(counter)}"))
    writer.clock = reactor  # type: ignore[assignment]
    writer.start(0.1)

    def grows() -> None:
        driver.get(url + "/job/job-live")
        wait_for(driver, lambda d: "live 1005" in d.find_element(By.ID, "log").text, 20, "live lines")

    try:
        await in_thread(grows)
    finally:
        writer.stop()
    record = worker.manager.jobs["job-live"]
    record.move(JobState.SUCCEEDED, record.started_at_ms + 9000, "succeeded")
    worker.logs.add("job-live", "stdout", "the very last line")

    def stops() -> None:
        wait_for(driver, lambda d: d.find_element(By.ID, "job-state").text == "succeeded", 20, "the new state")
        wait_for(driver, lambda d: "reload" in d.find_element(By.ID, "follow-status").text, 20,
                 "the follow to stop")
        assert "the very last line" in driver.find_element(By.ID, "log").text
        assert console_problems(driver) == []

    await in_thread(stops)


@pytest.fixture
def driver_without_js(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-nojs'}")
    options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield browser
    browser.quit()


@pytest_twisted.ensureDeferred
async def test_pages_and_kill_work_without_javascript(
    fake_site: tuple[FakeWorker, str], driver_without_js: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    worker, url = fake_site
    browser = driver_without_js

    def text_of(element_id: str) -> Callable[[Any], str]:
        return lambda d: str(d.find_element(By.ID, element_id).text)

    def walk() -> None:
        browser.get(url + "/")
        browser.find_element(By.LINK_TEXT, "job-live").click()
        wait_for(browser, lambda d: text_of("job-state")(d) == "running", 10, "the job page")
        assert "line 39" in text_of("log")(browser)  # server-rendered
        assert browser.find_element(By.ID, "follow-status").is_displayed() is False  # no JS, no follow
        browser.find_element(By.LINK_TEXT, "stderr").click()
        wait_for(browser, lambda d: "source=stderr" in d.current_url, 10, "the stderr tab")
        # 39 % 3 == 0: line 39 went to stderr, line 38 to stdout.
        wait_for(browser, lambda d: "line 39" in text_of("log")(d) and "line 38" not in text_of("log")(d),
                 10, "the stderr lines only")
        browser.find_element(By.CSS_SELECTOR, "form.kill button").click()
        # Without JS the confirmation is a page of its own.
        wait_for(browser, lambda d: "Kill job" in d.find_element(By.TAG_NAME, "h1").text, 10, "the confirm page")
        browser.save_screenshot(str(tmp_path / "confirm.png"))
        browser.find_element(By.CSS_SELECTOR, "form.confirm button").click()
        wait_for(browser, lambda d: text_of("job-state")(d) == "killed", 10, "the killed job page")
        assert browser.current_url.endswith("/job/job-live")

    await in_thread(walk)
    assert worker.manager.kills == [("job-live", 5000)]
    check_png(tmp_path / "confirm.png")
