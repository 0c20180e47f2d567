"""The review page (`d3qe ui`) against a real Triton server on the tiny fixture: its API, then the page itself
in headless Chromium (Debian's `chromium` and `chromedriver`, installed by `make browser`), which saves the
screenshots docs/ui.md shows."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageOps

from d3qe_serve.d3qe import load_detector, preprocess
from d3qe_serve.serving.endpoints import free_ports
from tests.helpers import LOGIT_TOL, write_video

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "docs" / "ui"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def page(tiny_server):
    """`d3qe ui` in a process of its own, as a user starts it; its base URL."""
    port = free_ports("127.0.0.1", 1)[0]
    cmd = [
        sys.executable,
        "-m",
        "d3qe_serve.cli.main",
        "ui",
        "--url",
        tiny_server.endpoints.grpc_url,
        "--port",
        str(port),
    ]
    cmd += ["--max-file-mb", "1", "--max-files", "12"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(base + "api/info", timeout=5).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.25)
        else:
            proc.kill()
            pytest.fail(f"d3qe ui did not answer: {proc.communicate()[0]}")
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def files(fixture_images, tmp_path_factory) -> dict[str, Path]:
    """Three fixture images, a corrupt 'image', an oversized one (over the page's 1 MB limit) and a video."""
    folder = tmp_path_factory.mktemp("uploads")
    chosen = {p.name: p for p in fixture_images[:3]}
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    (folder / "huge.bmp").write_bytes(os.urandom((1 << 20) + 1))
    frames = [np.asarray(ImageOps.fit(Image.open(p).convert("RGB"), (128, 128))) for p in fixture_images[:4]]
    write_video(folder / "clip.mkv", frames, rate=2)
    return {**chosen, **{p.name: p for p in sorted(folder.iterdir())}}


@pytest.fixture(scope="module")
def scored(tiny_server, files) -> dict[str, dict]:
    """What `d3qe score --json` prints for the same images, through the same server."""
    images = [str(p) for name, p in files.items() if not name.endswith(".mkv")]
    cmd = [
        sys.executable,
        "-m",
        "d3qe_serve.cli.main",
        "score",
        "--url",
        tiny_server.endpoints.grpc_url,
        "--json",
        *images,
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    return {Path(r["source"]).name: r for r in map(json.loads, out.splitlines())}


def _post(base: str, route: str, paths: list[Path], field: str = "files") -> requests.Response:
    handles = [(field, (p.name, p.open("rb"))) for p in paths]
    try:
        return requests.post(base + route, files=handles, timeout=300)
    finally:
        for _, (_, f) in handles:
            f.close()


def _leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("d3qe-ui-*")}


def test_the_api_scores_as_d3qe_score_and_fails_items_alone(page, files, scored):
    before = _leftovers()
    response = _post(page, "api/score", list(files.values()))
    assert response.ok, response.text
    rows = response.json()["results"]
    assert [r["source"] for r in rows] == list(files)  # one row per upload, in order
    by_name = {r["source"]: r for r in rows}
    for name, want in scored.items():
        got = by_name[name]
        if want["error"] is None:
            assert got["error"] is None and abs(got["logit"] - want["logit"]) <= 1e-6, (got, want)
        elif name != "huge.bmp":  # the page refuses it before the server sees it
            assert got["error"] == want["error"]
    assert "corrupt" in by_name["corrupt.png"]["error"] or "decodable" in by_name["corrupt.png"]["error"]
    assert by_name["huge.bmp"]["error"] == "file of 1.0 MB: the limit is 1 MB a file"
    video = by_name["clip.mkv"]
    assert video["kind"] == "video" and video["error"] is None and len(video["frames"]) == 4
    assert all(f["p_generated"] is not None for f in video["frames"])
    assert _leftovers() == before  # the video's temporary folder is gone


def test_the_api_refuses_too_many_files_and_no_files(page, files):
    corrupt = files["corrupt.png"]
    response = _post(page, "api/score", [corrupt] * 13)
    assert response.status_code == 413 and "Maximum number of files is 12" in response.json()["error"]
    response = requests.post(page + "api/score", data={"nothing": "here"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"] == "no files in the form field 'files'"


def test_evidence_is_the_eager_models(page, files, tiny_checkpoint):
    image = next(p for name, p in files.items() if name.endswith((".png", ".jpg")) and name != "corrupt.png")
    response = _post(page, "api/evidence", [image], field="file")
    assert response.ok, response.text
    got = response.json()
    model = load_detector(tiny_checkpoint)
    with torch.inference_mode():
        x = preprocess(image)[None]
        residual, indices = model.vq_model(x)
        error_map, attention, real, fake = (t[0].numpy() for t in model.evidence(residual, indices))
        logit = float(model(x))
    assert abs(got["logit"] - logit) <= LOGIT_TOL
    np.testing.assert_allclose(got["error_map"], error_map, atol=1e-4)
    np.testing.assert_allclose(got["attention"], attention, atol=1e-6)
    assert np.isclose(np.asarray(got["attention"]).mean(), 1 / 256)  # each query's weights sum to 1
    usage = got["codebook_usage"]
    codes, counts = np.unique(indices[0].numpy(), return_counts=True)
    assert got["codes_used"] == len(codes) == len(usage) and sum(u["tokens"] for u in usage) == 256
    assert [u["tokens"] for u in usage] == sorted(counts, reverse=True)
    first = usage[0]
    assert np.isclose(first["real_freq"], real[indices[0].numpy() == first["code"]][0])
    assert np.isclose(first["fake_freq"], fake[indices[0].numpy() == first["code"]][0])
    assert got["fake_leaning_share"] == pytest.approx(float(np.mean(fake > real)))

    refused = _post(page, "api/evidence", [files["corrupt.png"]], field="file")
    assert refused.status_code == 422 and "IMAGE: " in refused.json()["error"]


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: `make test` installs it (make browser)")
        pytest.skip("Debian's chromium and chromium-driver are not installed: run `make browser`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1300"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def rows_json(browser) -> dict[str, dict]:
    """What the JSON download saves, by source."""
    return {r["source"]: r for r in browser.execute_script("return results.map((r) => r.row)")}


def test_the_page_in_a_real_browser(page, browser, files, scored):
    from selenium.webdriver.common.by import By

    browser.get(page)
    _wait(browser, lambda d: "ready" in d.find_element(By.ID, "server").text)
    uploads = [files[n] for n in files if n != "huge.bmp"]
    browser.find_element(By.ID, "pick-files").send_keys("\n".join(str(p) for p in uploads))
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results tbody tr")) == len(uploads))
    _wait(browser, lambda d: d.find_element(By.ID, "status").text.startswith("Scored"))
    rows = {r.get_attribute("data-source"): r for r in browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")}
    for name, want in scored.items():
        if name in rows and want["error"] is None:
            assert rows[name].find_element(By.CSS_SELECTOR, "td.p").text == f"{want['probability']:.4f}"
            assert rows[name].find_element(By.CSS_SELECTOR, "td.verdict").text == want["verdict"]
    corrupt = rows["corrupt.png"].find_element(By.CSS_SELECTOR, "td.details .error").text
    assert corrupt == scored["corrupt.png"]["error"]
    timeline = rows["clip.mkv"].find_element(By.CSS_SELECTOR, ".timeline")
    assert timeline.find_element(By.CSS_SELECTOR, "polyline").get_attribute("points").count(",") == 4
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / "results.png"))
    # what the download buttons save
    table = list(csv.DictReader(io.StringIO(browser.execute_script("return toCsv()"))))
    assert [r["source"] for r in table] == list(rows)
    assert {r["source"]: r["error"] for r in table}["corrupt.png"] == scored["corrupt.png"]["error"]
    (video,) = [r for r in table if r["kind"] == "video"]
    assert json.loads(video["fake_periods"]) == rows_json(browser)["clip.mkv"]["fake_periods"]

    first = next(n for n in scored if scored[n]["error"] is None)
    rows[first].find_element(By.CSS_SELECTOR, ".evidence-button").click()
    _wait(browser, lambda d: d.find_element(By.ID, "evidence").is_displayed())
    summary = browser.find_element(By.ID, "evidence-summary").text
    assert f"P(generated) {scored[first]['probability']:.4f}" in summary and "distinct codes in 256 tokens" in summary
    assert len(browser.find_elements(By.CSS_SELECTOR, "#evidence-histogram rect.usage")) > 0
    scale = browser.find_element(By.ID, "evidence-scale").text
    assert scale.startswith("blue ") and " → red " in scale
    browser.execute_script("document.getElementById('evidence').scrollIntoView()")
    browser.save_screenshot(str(SCREENSHOTS / "evidence.png"))
    browser.find_element(By.CSS_SELECTOR, "input[name=overlay][value=attention]").click()
    assert browser.find_element(By.ID, "evidence-scale").text != scale  # the attention map has its own range
