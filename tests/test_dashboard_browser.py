"""The web dashboard in a real browser (Debian's Chromium, driven by Playwright) against a real
`gpuhop serve`: log in (a wrong token refused, then the login link), submit a job through the
form, watch it run with its output streaming and its attempt on the timeline, cancel it, and
look at offers, volumes and costs. A job whose output is markup stays text. Screenshots are kept
as test artefacts under test-artifacts/dashboard/ (or $GPUHOP_TEST_ARTIFACTS).

Skipped, saying why, where Chromium or Playwright is missing (.ci/run installs both)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulators.harness import Daemon

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("GPUHOP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("GPUHOP_TEST_ARTIFACTS") or Path(__file__).resolve().parent.parent / "test-artifacts")
WAIT_MS = 60_000  # generous: the machine may be loaded; nothing here measures speed
HOSTILE = "<img src=x onerror=\"window.pwned=1\"><script>window.pwned=2</script>"

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the install
    sync_playwright = None  # type: ignore[assignment]


@pytest.fixture
def page() -> Iterator[Page]:
    if sync_playwright is None:
        pytest.skip("playwright is not installed (pip install -e '.[dev]' installs it)")
    if not CHROMIUM:
        pytest.skip("no Chromium: install Debian's chromium package (.ci/run does) or set GPUHOP_CHROMIUM")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        pg = context.new_page()
        pg.set_default_timeout(WAIT_MS)
        expect.set_options(timeout=WAIT_MS)
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        yield pg
        context.close()
        browser.close()
        assert not errors, f"the page raised: {errors}"


def shot(page: Page, name: str) -> None:
    folder = ARTIFACTS / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def test_submit_watch_cancel_in_the_browser(page: Page, tmp_path: Path) -> None:
    config = ('[server]\nlisten = "127.0.0.1:0"\n[engine]\ntick_seconds = 0.5\n'
              '[providers.local]\ncpu_slots = 2\nisolation = "none"\n')
    daemon = Daemon(tmp_path / "state", config)
    client = daemon.start()
    try:
        # a finished job first, so that costs and the jobs table have something to show
        done = client.submit({"name": "warm-up", "command": ["sh", "-c", "echo warm"], "resources": {"gpu_count": 0},
                              "volume": {"name": "warm-vol", "size_gb": 1}})
        daemon.wait_status(done["id"], {"succeeded"}, timeout=120)

        page.goto(client.url + "/")
        page.get_by_test_id("token").fill("not-the-token")
        page.get_by_test_id("login").click()
        expect(page.get_by_test_id("login-error")).to_contain_text("refused")
        page.goto(client.url + "/#token=" + client.token)  # the link `gpuhop dashboard` prints
        expect(page.locator(f'[data-job="{done["id"]}"]')).to_contain_text("succeeded")
        assert "token" not in page.url  # the token left the address bar
        shot(page, "1-jobs")

        page.get_by_text("Submit a job").click()
        page.get_by_test_id("f-name").fill("browser-job")
        page.get_by_test_id("f-command").fill(f"printf '%s\\n' '{HOSTILE}'; echo step-1; sleep 600")
        page.get_by_test_id("f-gpu_count").fill("0")
        page.get_by_test_id("submit").click()
        header = page.locator("h1").get_by_test_id("status")
        expect(header).to_have_text("running")
        logs = page.get_by_test_id("logs")
        expect(logs).to_contain_text("step-1")
        expect(logs).to_contain_text(HOSTILE)  # shown as the text it is
        assert page.evaluate("window.pwned") is None, "the job's output ran as code"
        assert page.locator("pre.logs img, pre.logs script").count() == 0
        expect(page.get_by_test_id("timeline").locator("rect")).to_have_count(1)
        job_id = page.url.rsplit("/", 1)[1]
        assert client.job(job_id)["name"] == "browser-job"
        shot(page, "2-job-running")

        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_test_id("cancel").click()
        expect(header).to_have_text("cancelled")
        expect(page.get_by_test_id("why")).to_contain_text("cancel")
        ended: dict[str, Any] = client.job(job_id)
        assert ended["status"] == "cancelled" and all(a["status"] == "ended" for a in ended["attempts"])
        shot(page, "3-job-cancelled")

        page.get_by_test_id("nav-offers").click()
        expect(page.get_by_test_id("offers").locator("tbody tr").first).to_contain_text("local")
        page.get_by_test_id("nav-volumes").click()
        expect(page.get_by_test_id("volumes")).to_contain_text("warm-vol")
        shot(page, "4-volumes")
        page.once("dialog", lambda dialog: dialog.accept())  # the warm-up job ended: its volume may go
        page.locator('[data-testid=delete-volume][data-volume="warm-vol"]').click()
        expect(page.get_by_test_id("volumes")).not_to_contain_text("warm-vol")
        assert all(v["name"] != "warm-vol" for v in client.volumes()["volumes"])
        page.get_by_test_id("nav-costs").click()
        expect(page.get_by_test_id("cost-chart").locator("rect")).not_to_have_count(0)
        expect(page.get_by_test_id("costs-provider")).to_contain_text("local")
        shot(page, "5-costs")
        page.get_by_test_id("nav-jobs").click()
        expect(page.locator(f'[data-job="{job_id}"]')).to_contain_text("cancelled")
    finally:
        daemon.stop()
