"""End to end in a real browser: `streamlit run` serves the app, Playwright drives Debian's
chromium (never a downloaded browser), a prompt goes in, the heat map comes out."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from . import streamlit_ids as ids

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def streamlit_url(tiny_model_dir, tiny_model_dirs, tiny_trained_dir, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: apt-get install -y chromium chromium-driver")
    port = _free_port()
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    env = dict(os.environ, M2R2_MODEL_DIR=str(tiny_model_dir),
               M2R2_TRAINED_DIR=str(tiny_trained_dir),
               M2R2_MOE_DIR=str(tiny_model_dirs["mixtral"]))
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless",
             "true", "--server.port", str(port), "--server.address", "127.0.0.1",
             "--browser.gatherUsageStats", "false"], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server, log)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited early:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                if answer.read().decode().strip() == "ok":
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"streamlit did not become healthy:\n{log.read_text()}")


def _open(pw):
    """Debian's chromium, headless, with a wide page."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])
    return browser, browser.new_page(viewport={"width": 1400, "height": 1000})


def _generate_on(page, url: str, button: str, result_id: str) -> None:
    """Open a page, type a prompt, press its generate button, wait for the result and idle."""
    from playwright.sync_api import expect

    page.goto(url)
    prompt = page.get_by_test_id(ids.TEXT_AREA).locator("textarea")
    prompt.wait_for(timeout=60_000)
    prompt.fill("Why is the sky blue?")
    prompt.press("Control+Enter")
    page.get_by_role("button", name=button).click()
    expect(page.get_by_test_id(result_id).first).to_be_visible(timeout=90_000)
    page.locator(ids.APP_IDLE).wait_for(timeout=90_000)


def _refused_and_kept(page, label: str, value: str, needle: str, kept_id: str) -> None:
    """Type an out-of-range value: a message appears, the earlier result stays, no traceback."""
    from playwright.sync_api import expect

    field = page.get_by_label(label, exact=True).first
    field.fill(value)
    field.press("Enter")
    expect(page.get_by_test_id(ids.ERROR).first).to_contain_text(needle, timeout=30_000)
    expect(page.get_by_test_id(kept_id).first).to_be_visible()
    expect(page.get_by_test_id(ids.EXCEPTION)).to_have_count(0)
    # the rerun that showed the message may still be drawing: wait for the script to finish
    page.locator(ids.APP_IDLE).wait_for(timeout=90_000)


def _download(page, name: str):
    """Press a download button once the page is idle and return the download.

    The pages write a download's file with the page (app/components/bundles.py): a lazy button,
    whose file Streamlit writes when pressed, sometimes lost the press and spun for ever (CI saw
    it twice), so one press must now be enough.
    """
    from playwright.sync_api import expect

    page.locator(ids.APP_IDLE).wait_for(timeout=90_000)
    button = page.get_by_role("button", name=name).first
    expect(button).to_be_enabled(timeout=30_000)
    with page.expect_download(timeout=60_000) as download:
        button.click()
    return download.value


def test_generate_in_browser(streamlit_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shot_dir = Path(os.environ.get("M2R2_SCREENSHOT_DIR", tmp_path))
    with sync_playwright() as pw:
        browser, page = _open(pw)
        try:
            page.goto(streamlit_url)
            prompt = page.get_by_test_id(ids.TEXT_AREA).locator("textarea")
            prompt.wait_for(timeout=60_000)
            prompt.fill("Why is the sky blue?")
            prompt.press("Control+Enter")
            page.get_by_role("button", name="Generate").click()
            expect(page.get_by_test_id(ids.PLOTLY_CHART).first).to_be_visible(timeout=90_000)
            page.locator(ids.APP_IDLE).wait_for(timeout=90_000)
            expect(page.get_by_test_id(ids.TOKEN_STRIP).first).to_be_visible()
            expect(page.get_by_test_id(ids.EXCEPTION)).to_have_count(0)
            assert page.get_by_test_id(ids.PLOTLY_CHART).count() >= 3
            # bad input in the real page: an empty prompt gives a message, not a traceback
            prompt.fill("")
            prompt.press("Control+Enter")
            page.get_by_role("button", name="Generate").click()
            expect(page.get_by_test_id(ids.ERROR).first).to_contain_text("empty", timeout=30_000)
            expect(page.get_by_test_id(ids.PLOTLY_CHART).first).to_be_visible()
            expect(page.get_by_test_id(ids.EXCEPTION)).to_have_count(0)
        finally:
            page.screenshot(path=str(shot_dir / "residual_dynamics.png"), full_page=True)
            browser.close()


def _visible_metric(page, label: str):
    """The first metric with this label that is on screen (folded panels repeat labels)."""
    return page.locator("[data-testid=stMetricLabel]:visible", has_text=label).first


def test_exit_debugger_in_browser(streamlit_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shot_dir = Path(os.environ.get("M2R2_SCREENSHOT_DIR", tmp_path))
    with sync_playwright() as pw:
        browser, page = _open(pw)
        try:
            _generate_on(page, f"{streamlit_url}/exits", "Generate with early exit",
                         ids.EXIT_STRIP)
            visible_chart = page.locator(f"[data-testid={ids.PLOTLY_CHART}]:visible").first
            expect(visible_chart).to_be_visible(timeout=30_000)
            assert page.get_by_test_id(ids.PLOTLY_CHART).count() >= 3
            expect(_visible_metric(page, "Measured speedup")).to_be_visible()
            expect(page.get_by_test_id(ids.EXCEPTION)).to_have_count(0)
            # an out-of-range threshold (the generation one: the first labelled so) is refused
            _refused_and_kept(page, "Threshold", "1.5", "threshold", ids.EXIT_STRIP)
            # the run's bundle re-opens in a fresh session without generating; a damaged one
            # is refused with a message and the page keeps what it showed
            saved = tmp_path / "exit-bundle.json"
            _download(page, "Download bundle (JSON)").save_as(saved)
            page.goto(f"{streamlit_url}/exits")
            page.locator('input[type="file"]').first.set_input_files(str(saved))
            expect(page.get_by_test_id(ids.EXIT_STRIP).first).to_be_visible(timeout=60_000)
            expect(_visible_metric(page, "Measured speedup")).to_be_visible()
            broken = tmp_path / "broken.json"
            broken.write_text(saved.read_text()[:500])
            page.locator('input[type="file"]').first.set_input_files(str(broken))
            expect(page.get_by_test_id(ids.ERROR).first).to_contain_text("not valid JSON",
                                                                         timeout=30_000)
            expect(page.get_by_test_id(ids.EXIT_STRIP).first).to_be_visible()
            expect(page.get_by_test_id(ids.EXCEPTION)).to_have_count(0)
            # calibrate a threshold with a guarantee, on a handful of prompts
            page.locator("[data-testid=stExpander] summary",
                         has_text="Calibrate a threshold with a guarantee").first.click()
            for label, value in (("Quality at least", "0.1"), ("δ (1 − confidence)", "0.5"),
                                 ("Calibration prompts", "2"), ("Held-out prompts", "1"),
                                 ("Tokens each", "4")):
                field = page.get_by_label(label, exact=True).first
                field.fill(value)
                field.press("Enter")
            page.get_by_role("button", name="Calibrate", exact=True).click()
            expect(_visible_metric(page, "Certified threshold")).to_be_visible(timeout=180_000)
            expect(page.get_by_test_id(ids.EXCEPTION)).to_have_count(0)
        finally:
            page.screenshot(path=str(shot_dir / "exit_debugger.png"), full_page=True)
            browser.close()


def test_speculative_page_in_browser(streamlit_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shot_dir = Path(os.environ.get("M2R2_SCREENSHOT_DIR", tmp_path))
    with sync_playwright() as pw:
        browser, page = _open(pw)
        try:
            _generate_on(page, f"{streamlit_url}/speculative", "Generate speculatively",
                         ids.SPEC_STRIP)
            expect(page.get_by_text("Tokens per verification", exact=True).first).to_be_visible()
            assert page.get_by_test_id(ids.PLOTLY_CHART).count() >= 4
            expect(page.get_by_test_id(ids.EXCEPTION)).to_have_count(0)
            _refused_and_kept(page, "Max drafts K", "0", "max_draft", ids.SPEC_STRIP)
        finally:
            page.screenshot(path=str(shot_dir / "speculative.png"), full_page=True)
            browser.close()


def test_expert_loading_page_in_browser(streamlit_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shot_dir = Path(os.environ.get("M2R2_SCREENSHOT_DIR", tmp_path))
    with sync_playwright() as pw:
        browser, page = _open(pw)
        try:
            _generate_on(page, f"{streamlit_url}/experts", "Generate with offloaded experts",
                         ids.EXPERT_STRIP)
            expect(page.get_by_text("Speedup vs on-demand LRU", exact=True).first) \
                .to_be_visible()
            assert page.get_by_test_id(ids.PLOTLY_CHART).count() >= 3
            expect(page.get_by_test_id(ids.EXCEPTION)).to_have_count(0)
            _refused_and_kept(page, "Capacity (experts)", "1", "the minimum capacity is 2",
                              ids.EXPERT_STRIP)
        finally:
            page.screenshot(path=str(shot_dir / "experts.png"), full_page=True)
            browser.close()
