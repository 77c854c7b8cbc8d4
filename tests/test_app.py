"""`refgen app` in a real browser: the app runs as `refgen app` on a loopback port (the toy model on the CPU) and
headless Chromium (Debian's chromium + chromium-driver, through selenium) uploads two people's photos, types a
two-person prompt and generates; then a prompt with the wrong slot count must show the CLI's message in the page.

`python tests/test_app.py --screenshot docs/assets/app.png` drives the same page with more inversion steps and
four seeds and saves the README's screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
TWO = "A photo of two people on a beach: on the left, ~ID~; on the right, ~ID~."
ONE = "A photo of ~ID~ on a beach."
WRONG_COUNT = "prompt has 1 placeholder(s) '~ID~' but 2 identities were given"


def _require(what: str, ok: bool) -> None:
    """CI installs the browser (.ci/run); elsewhere a missing one skips, naming what to install."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing; .ci/run installs it")
    pytest.skip(f"{what} is missing: apt-get install chromium chromium-driver; pip install -e '.[test]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(work: Path, invert_steps: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`refgen app` on a free loopback port; returns once the page answers (or fails with the app's log)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, "-m", "refgen.cli", "app", "--port", str(port), "--threads", "1", "--invert-steps",
           str(invert_steps), "--work-dir", str(work)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"refgen app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"refgen app did not answer on {url} within 180 s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def open_browser(profile: Path, width: int = 1300, height: int = 1500):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))


def wait_for(driver, what: str, cond, timeout: float):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: cond(d))
    except Exception as e:
        status = driver.find_element("css selector", "#status").text
        raise AssertionError(f"timed out waiting for {what}; the page's status says: {status!r}") from e


def type_into(driver, css: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("css selector", f"{css} textarea, {css} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    box.send_keys(Keys.TAB)  # Gradio takes the value on change/blur


def upload(driver, person: int, files: list[Path]) -> None:
    field = driver.find_element("css selector", f"#person{person}_photos input[type=file]")
    field.send_keys("\n".join(str(f) for f in files))
    wait_for(driver, f"person {person}'s {len(files)} uploads",
             lambda d: all(f.stem in d.find_element("css selector", f"#person{person}_photos").text for f in files),
             60)


def gallery_images(driver) -> int:
    """Distinct images the gallery shows (thumbnails, and the preview when one is open)."""
    srcs = {im.get_attribute("src") for im in driver.find_elements("css selector", "#gallery img")}
    return len({s for s in srcs if s})


def generate(driver, prompt: str, seeds: str) -> None:
    type_into(driver, "#prompt", prompt)
    type_into(driver, "#seeds", seeds)
    driver.find_element("css selector", "#generate").click()


def people_photos(root: Path, seeds=(200_003, 200_011)) -> list[list[Path]]:
    from refgen.toyworld.identities import make_identities

    folders = [make_identities(root, n=1, seed=s, progress=False)[0] for s in seeds]
    return [sorted(f.glob("*.png")) for f in folders]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    _require("Debian's chromium and chromium-driver", bool(CHROMIUM and DRIVER))
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as e:
        _require(f"the Python package {e.name}", False)
    tmp = tmp_path_factory.mktemp("app")
    proc, url = start_app(tmp / "work", invert_steps=20, log=tmp / "app.log")
    driver = None
    try:
        driver = open_browser(tmp / "chromium-profile")
        driver.get(url)
        wait_for(driver, "the page", lambda d: d.find_elements("css selector", "#generate"), 60)
        yield driver, tmp
    finally:
        if driver is not None:
            driver.quit()
        stop(proc)


def test_two_people_from_photos_then_a_wrong_slot_count_in_the_browser(page):
    driver, tmp = page
    photos = people_photos(tmp / "people")
    upload(driver, 1, photos[0])
    upload(driver, 2, photos[1])
    generate(driver, TWO, "0,1")
    wait_for(driver, "the slot box to show two slots",
             lambda d: "2 slots" in d.find_element("css selector", "#slots").text, 30)
    progress = set()  # what the page said while it worked (each inversion takes seconds: it is seen)

    def done(d):
        progress.update(t for t in ("person 1 of 2: teacher inversion", "person 2 of 2: teacher inversion")
                        if t in d.find_element("css selector", "#gallery").text)
        return gallery_images(d) == 2

    wait_for(driver, "two images in the gallery", done, 150)
    assert progress == {"person 1 of 2: teacher inversion", "person 2 of 2: teacher inversion"}, progress
    wait_for(driver, "the summary", lambda d: "2 image(s)" in d.find_element("css selector", "#status").text, 10)
    status = driver.find_element("css selector", "#status").text
    assert "2 image(s)" in status and "person 1:" in status and "person 2:" in status, status
    # what the download holds: both images and the record of how they were made
    zips = sorted((tmp / "work" / "downloads").glob("*.zip"))
    assert len(zips) == 1
    with zipfile.ZipFile(zips[0]) as z:
        assert sorted(z.namelist()) == ["generate.json", "seed0.png", "seed1.png"]
        rec = json.loads(z.read("generate.json"))
    assert rec["prompt"] == TWO and rec["seeds"] == [0, 1] and len(rec["slots"]) == 2
    assert [p["from"] for p in rec["people"]] == [f"{len(photos[0])} photo(s), teacher inversion (20 steps)",
                                                  f"{len(photos[1])} photo(s), teacher inversion (20 steps)"]
    assert len(list((tmp / "work" / "inversions").glob("*/ref_*/teacher_tokens.safetensors"))) == 2  # the default mode

    # the alpha-grid tab: the same people (their inversions are reused), rows of alpha multipliers
    driver.find_element("xpath", "//button[@role='tab'][normalize-space()='Alpha grid']").click()
    type_into(driver, "#grid_alphas", "0,1,1.5")
    driver.find_element("css selector", "#grid_button").click()
    wait_for(driver, "the alpha grid", lambda d: "3 α rows x 2 seeds" in d.find_element("css selector", "#status").text
             and d.find_elements("css selector", "#grid img"), 60)
    assert len(list((tmp / "work" / "inversions").glob("*/ref_*/teacher.json"))) == 2  # nothing inverted again
    driver.find_element("xpath", "//button[@role='tab'][normalize-space()='Images']").click()

    generate(driver, ONE, "0,1")  # two people given, one slot: the CLI's message, in the page
    wait_for(driver, "the slot-count error", lambda d: WRONG_COUNT in d.find_element("css selector", "#status").text,
             60)
    assert "Traceback" not in driver.page_source
    driver.save_screenshot(str(tmp / "app.png"))


def main(argv: list[str] | None = None) -> int:
    """The README's screenshot: two toy people inverted for 300 steps, four seeds."""
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--screenshot", required=True)
    p.add_argument("--invert-steps", type=int, default=300)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="refgen_app_shot_"))
    proc, url = start_app(tmp / "work", args.invert_steps, tmp / "app.log")
    driver = open_browser(tmp / "profile", 1300, 1700)
    try:
        driver.get(url)
        wait_for(driver, "the page", lambda d: d.find_elements("css selector", "#generate"), 60)
        photos = people_photos(tmp / "people")
        upload(driver, 1, photos[0])
        upload(driver, 2, photos[1])
        generate(driver, TWO, "0-3")
        wait_for(driver, "four images", lambda d: gallery_images(d) == 4, 900)
        driver.save_screenshot(args.screenshot)
        print(f"wrote {args.screenshot}")
    finally:
        driver.quit()
        stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
