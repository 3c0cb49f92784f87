"""The demo page in a real browser: start demo.py, load the page in headless Chromium, type a
caption, press the button, wait until every model's player holds a clip, save a screenshot.

    apt-get install -y chromium                  # Debian's Chromium (Playwright drives it as it is)
    pip install -r requirements-demo.txt playwright
    python scripts/demo_browser_check.py                       # a fresh tiny run in a temp folder
    python scripts/demo_browser_check.py --run runs/cpu --screenshot docs/demo.png

Playwright's own browser downloads are not needed: it is pointed at --chromium. The run folder is
only read. Prints the page's load time and the generation's time as the browser sees them (click to
the last player); exits non-zero when a step fails.
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a tiny run in seconds: every stage for a few steps on half-second clips (the embedder stage too,
# as --stage all trains it; the demo does not use it)
TINY = ["--stage", "all", "--preset", "tiny", "--set", "train.steps=4", "train.ckpt_every=4",
        "train.eval_every=4", "data.seconds=0.5", "data.stats_clips=8", "model.text_width=32",
        "clap.steps=4", "clap.eval_every=4", "distill.steps=5", "layerdrop.steps=4"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url, server, timeout):
    """Seconds until url answers 200 (the server process must stay alive meanwhile)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"demo.py exited with code {server.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def check(url, caption, screenshot, chromium, timeout):
    """Drive the page; returns (load seconds, generation seconds, number of players filled)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])   # root in a container
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        t0 = time.perf_counter()
        page.goto(url, wait_until="load")
        page.locator("#generate").wait_for(state="visible", timeout=timeout * 1000)
        t_load = time.perf_counter() - t0
        models = page.locator("[id^=model-]").count()
        if models == 0:
            raise RuntimeError("the page shows no model")
        page.locator("#caption textarea").fill(caption)
        t0 = time.perf_counter()
        page.locator("#generate").click()
        page.locator("#status").get_by_text("Generated").wait_for(timeout=timeout * 1000)
        # a player holds a clip once it offers the clip's WAV for download
        page.wait_for_function("n => document.querySelectorAll("
                               "'[id^=model-] a[data-testid=download-link][href$=\".wav\"]').length >= n",
                               arg=models, timeout=timeout * 1000)
        t_gen = time.perf_counter() - t0
        page.wait_for_timeout(1000)            # let the waveforms and pictures draw
        os.makedirs(os.path.dirname(os.path.abspath(screenshot)), exist_ok=True)
        page.screenshot(path=screenshot, full_page=True)
        browser.close()
    return t_load, t_gen, models


def main(argv=None):
    p = argparse.ArgumentParser(description="Load the demo page in headless Chromium, generate once, "
                                "save a screenshot.")
    p.add_argument("--run", default=None, help="run folder (default: a fresh tiny run in a temp folder)")
    p.add_argument("--caption", default="slow organ chords in C major")
    p.add_argument("--screenshot", default=os.path.join(ROOT, "docs", "demo.png"))
    p.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium binary Playwright drives")
    p.add_argument("--threads", type=int, default=0, help="demo.py --threads")
    p.add_argument("--timeout", type=int, default=300, help="seconds any one step may take")
    args = p.parse_args(argv)
    if not os.path.isfile(args.chromium):
        sys.exit(f"error: no Chromium at {args.chromium} (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="presto-browser-check-") as tmp:
        run = args.run
        if run is None:
            import train
            run = os.path.join(tmp, "tiny")
            t0 = time.perf_counter()
            train.main([*TINY, "--out", run])
            print(f"tiny run trained in {time.perf_counter() - t0:.1f} s", flush=True)
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        t0 = time.perf_counter()
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "demo.py"), "--run", run,
                                   "--port", str(port), "--threads", str(args.threads)], cwd=ROOT)
        try:
            t_start = wait_for(url, server, args.timeout)
            t_load, t_gen, n = check(url, args.caption, args.screenshot, args.chromium, args.timeout)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"demo server up (models loaded and warmed up) in {t_start:.1f} s; page loaded in "
          f"{t_load:.2f} s; generation with {n} models, click to the last player, {t_gen:.2f} s; "
          f"screenshot {args.screenshot}")


if __name__ == "__main__":
    main()
