"""Regenerate the docs screenshots: serve the app with the default model, generate in headless
Debian chromium (Playwright), and save a full-height screenshot.

    .venv/bin/python docs/make_screenshot.py "Why is the sky blue?"            # Residual Dynamics
    .venv/bin/python docs/make_screenshot.py "Why is the sky blue?" exits      # Exit debugger
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
            time.sleep(3)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        server.terminate()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "Why is the sky blue?",
         sys.argv[2] if len(sys.argv) > 2 else "residuals")
