"""Regenerate the docs screenshots: serve the app with the default model, generate in headless
Debian chromium (Playwright), and save a full-height screenshot.

    .venv/bin/python docs/make_screenshot.py "Why is the sky blue?"            # Residual Dynamics
    .venv/bin/python docs/make_screenshot.py "Why is the sky blue?" exits      # Exit debugger
    .venv/bin/python docs/make_screenshot.py "Why is the sky blue?" calibrate  # ... calibrated
    .venv/bin/python docs/make_screenshot.py "Why is the sky blue?" speculative
    .venv/bin/python docs/make_screenshot.py "Why is the sky blue?" experts
"""

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
PORT = 8765


PAGES = {"residuals": ("", "Generate", "residual_dynamics.png", 4300, "stPlotlyChart"),
         "exits": ("/exits", "Generate with early exit", "exit_debugger.png", 5200,
                   "stPlotlyChart"),
         "calibrate": ("/exits", "Generate with early exit", "exit_calibration.png", 5200,
                       "stPlotlyChart"),
         "speculative": ("/speculative", "Generate speculatively", "speculative.png", 4200,
                         "m2r2-spec-strip"),
         "experts": ("/experts", "Generate with offloaded experts", "experts.png", 4600,
                     "m2r2-expert-strip")}


def main(prompt: str, page_name: str) -> None:
    """Serve, generate on one page, screenshot it into docs/."""
    path, button, name, height, result = PAGES[page_name]
    out = ROOT / "docs" / name
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
         "--server.port", str(PORT), "--browser.gatherUsageStats", "false"], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{PORT}"
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1500, "height": height})
            page.goto(url + path)
            box = page.get_by_test_id("stTextArea").locator("textarea")
            box.wait_for(timeout=300_000)
            box.fill(prompt)
            box.press("Control+Enter")
            page.get_by_role("button", name=button).click()
            expect(page.get_by_test_id(result).first).to_be_visible(timeout=300_000)
            page.locator("[data-testid='stApp'][data-test-script-state='notRunning']").wait_for(
                timeout=300_000)
            if page_name == "calibrate":
                _calibrate(page)
            time.sleep(3)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        server.terminate()


def _calibrate(page) -> None:
    """Calibrate the default rule on a handful of prompts (a small run, to show the flow: the
    figures in BENCHMARKS.md come from `analysis.calibrate`), then open the speedup ledger.
    """
    from playwright.sync_api import expect

    page.set_default_timeout(300_000)  # each change reruns a long page on a busy CPU
    title = "Calibrate a threshold with a guarantee"
    summary = page.locator("[data-testid=stExpander] summary", has_text=title).first
    panel = page.locator("[data-testid=stExpander]").filter(
        has=page.locator("summary", has_text=title)).first
    for label, value in (("Quality at least", "0.5"), ("δ (1 − confidence)", "0.2"),
                         ("Calibration prompts", "6"), ("Held-out prompts", "4"),
                         ("Tokens each", "12")):
        field = panel.get_by_label(label, exact=True).first
        if not field.is_visible():  # a rerun may draw the expander closed again
            summary.click()
            field.wait_for(state="visible", timeout=30_000)
        field.fill(value)
        field.press("Enter")
        page.locator("[data-testid='stApp'][data-test-script-state='notRunning']").wait_for(
            timeout=60_000)
    if not page.get_by_role("button", name="Calibrate", exact=True).is_visible():
        summary.click()
    page.get_by_role("button", name="Calibrate", exact=True).click()
    expect(page.get_by_text("Certified threshold", exact=True).first).to_be_visible(
        timeout=900_000)
    page.locator("[data-testid='stApp'][data-test-script-state='notRunning']").wait_for(
        timeout=300_000)
    page.locator("[data-testid=stExpander] summary", has_text="Speedup ledger").first.click()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "Why is the sky blue?",
         sys.argv[2] if len(sys.argv) > 2 else "residuals")
