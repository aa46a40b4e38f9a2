"""Remake docs/ab-miniature.png: a compare run on the built-in `miniature-semantics` prompts, as a clean clone shows it.

    .venv/bin/python scripts/ab_screenshot.py [--models-file FILE] [--out docs/ab-miniature.png]

Starts `t2i serve` on 127.0.0.1 (the shipped miniature kit unless --models-file), opens `/ab` in headless Chromium
(Playwright), runs the encoders below on seed 0, saves a full-page screenshot and stops the server by its pid.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from service.redis_server import free_port

ENCODERS = ("t5-xxl", "t5-xxl-int8", "t5-base", "t5-small")
START_CAP_S = 600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-file", type=Path, help="default: the shipped miniature kit")
    parser.add_argument("--out", type=Path, default=Path("docs/ab-miniature.png"))
    parser.add_argument("--encoders", default=",".join(ENCODERS), help="comma-separated, the first is the reference")
    parser.add_argument("--chromium", default=os.environ.get("T2I_TEST_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()
    encoders = args.encoders.split(",")

    # 1. `t2i serve` on loopback, in a fresh home, waited for until ready (or until it exits, with its log).
    home = Path(tempfile.mkdtemp(prefix="t2i-ab-"))
    env = {**os.environ, "T2I_HOME": str(home), "T2I_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if args.models_file:
        env["T2I_MODELS_FILE"] = str(args.models_file.resolve())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(home / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port",
                                   str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_CAP_S
        while True:
            if server.poll() is not None:
                sys.exit(f"t2i serve exited with {server.returncode}:\n{(home / 'serve.log').read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"t2i serve not ready after {START_CAP_S} s; its log: {home / 'serve.log'}")
            time.sleep(0.3)

        # 2. The page as a user fills it: the prompt set, the encoders (the first as reference), seed 0.
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/ab")
            page.wait_for_selector(f"#encoders input[value='{encoders[-1]}']")
            page.select_option("#prompt-set", "miniature-semantics")
            for box in page.query_selector_all("#encoders input"):
                box.set_checked(box.get_attribute("value") in encoders)
            page.select_option("#reference", encoders[0])
            page.fill("#seeds", "0")
            page.click("#start")
            page.wait_for_selector("#run-status.done", timeout=600_000)
            page.wait_for_function(
                "[...document.querySelectorAll('#grid img.cell-image')].every(i => i.naturalWidth > 0)")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
