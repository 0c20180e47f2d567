from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score

from d3qe_serve.cli.main import main
from d3qe_serve.client.eval import compute_metrics, crop, discover, jpeg, verdict_threshold
from d3qe_serve.client.results import ScoreResult
from d3qe_serve.errors import InputError

# The fixture's images as a two-generator test set: name → (generator, class folder).
LAYOUT = {
    "gray_300x300.png": ("genA", "0_real"),
    "landscape_400x300.png": ("genA", "0_real"),
    "palette_320x200.png": ("genA", "1_fake"),
    "portrait_rgba_240x320.png": ("genA", "1_fake"),
    "small_100x80.png": ("genB", "0_real"),
    "square_256.jpg": ("genB", "1_fake"),
    "wide_1024x200.jpg": ("genB", "1_fake"),
}
BROKEN = ("genB", "1_fake", "broken.png")


@pytest.fixture(scope="module")
def labelled_folder(fixture_images, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("testset")
    for path in fixture_images:
        gen, cls = LAYOUT[path.name]
        (root / gen / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / gen / cls / path.name)
    (root / BROKEN[0] / BROKEN[1] / BROKEN[2]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def expected_metrics(expected) -> dict[str, dict]:
    """Upstream's validate() on the fixture's own logits: the independent truth for the eval table."""
    logit = dict(zip(map(str, expected["image_names"]), expected["image_logits_reference"][:, 0], strict=True))
    out = {}
    for gen in ("genA", "genB"):
        names = [n for n, (g, _) in LAYOUT.items() if g == gen]
        y = np.array([LAYOUT[n][1] == "1_fake" for n in names], dtype=int)
        p = 1 / (1 + np.exp(-np.array([logit[n] for n in names], dtype=np.float64)))
        out[gen] = {
            "acc": np.mean((p > 0.5) == y),
            "ap": average_precision_score(y, p),
            "r_acc": np.mean(p[y == 0] <= 0.5),
            "f_acc": np.mean(p[y == 1] > 0.5),
        }
    return out


def run_eval(args: list[str], out: Path) -> tuple[int, dict]:
    code = main(["eval", *args, "--no-progress", "--out", str(out)])
    return code, json.loads(out.read_text())


def metrics_by_gen(report: dict, setting: str) -> dict[str, dict]:
    return {m["generator"]: m for m in report["settings"][setting]["metrics"]}


@pytest.fixture(scope="module")
def eager_report(labelled_folder, tiny_checkpoint, tmp_path_factory) -> tuple[int, dict]:
    out = tmp_path_factory.mktemp("eval") / "eager.json"
    args = ["--dataroot", str(labelled_folder), "--runtime", "eager", "--checkpoint", str(tiny_checkpoint)]
    return run_eval([*args, "--jpeg-quality", "75", "--crop-ratio", "0.6"], out)


def test_discover_reads_upstream_layouts(labelled_folder, tmp_path):
    data = discover(labelled_folder)
    assert sorted(data) == ["genA", "genB"]
    assert {p.name: label for p, label in data["genB"]} == {
        "small_100x80.png": 0,
        "square_256.jpg": 1,
        "wide_1024x200.jpg": 1,
        "broken.png": 1,
    }
    # a single generator's folder, and upstream's object-class level between generator and 0_real/1_fake
    assert list(discover(labelled_folder / "genA")) == ["genA"]
    shutil.copytree(labelled_folder / "genA", tmp_path / "genC" / "cat")
    shutil.copytree(labelled_folder / "genB", tmp_path / "genC" / "dog")
    assert len(discover(tmp_path)["genC"]) == 8
    with pytest.raises(FileNotFoundError, match="no 0_real/ or 1_fake/"):
        discover(tmp_path / "genC" / "cat" / "0_real")


def test_eager_eval_matches_upstream_metrics_on_fixture_logits(eager_report, expected, labelled_folder):
    code, report = eager_report
    assert code == 1  # the broken file is reported, not dropped
    clean = metrics_by_gen(report, "clean")
    truth = expected_metrics(expected)
    for gen, want in truth.items():
        for key, value in want.items():
            assert clean[gen][key] == pytest.approx(value, abs=1e-9), (gen, key)
    assert clean["mean"]["acc"] == pytest.approx((truth["genA"]["acc"] + truth["genB"]["acc"]) / 2)
    assert clean["mean"]["ap"] == pytest.approx((truth["genA"]["ap"] + truth["genB"]["ap"]) / 2)
    assert (clean["genB"]["n_real"], clean["genB"]["n_fake"], clean["genB"]["failed"]) == (1, 2, 1)
    broken = [i for i in report["settings"]["clean"]["images"]["genB"] if i["source"].endswith("broken.png")]
    assert len(broken) == 1 and broken[0]["error"] and broken[0]["logit"] is None


def test_score_verdict_and_eval_decide_alike_at_the_threshold():
    """Upstream's validate() calls P > 0.5 fake; `d3qe score`'s verdict must not disagree at P = 0.5."""
    probs = np.array([0.5, np.nextafter(0.5, 1.0)])
    metrics = compute_metrics("g", np.array([1, 1]), probs, failed=0, threshold=0.5)
    assert metrics.acc == pytest.approx(0.5)
    assert [ScoreResult.from_scores("x", 0.0, float(p)).verdict for p in probs] == ["real", "generated"]
    assert ScoreResult.from_logit("x", 0.0).verdict == "real"


def test_eval_measures_at_the_threshold_the_verdicts_used():
    """No --threshold: the one the results carry (the served or exported operating point), else 0.5."""
    served = [ScoreResult.from_scores(f"i{k}", 0.0, p, threshold=0.8) for k, p in enumerate((0.7, 0.9))]
    assert verdict_threshold(served) == 0.8
    assert verdict_threshold(served, 0.3) == 0.3
    assert verdict_threshold([ScoreResult.failed("x", "broken"), ScoreResult("y", 0.0, 0.5, "real")]) == 0.5
    with pytest.raises(InputError, match="different thresholds"):
        verdict_threshold([*served, ScoreResult.from_scores("z", 0.0, 0.9, threshold=0.5)])


def test_sweeps_change_the_scores(eager_report):
    _, report = eager_report
    assert set(report["settings"]) == {"clean", "jpeg75", "crop0.6"}

    def logits(setting: str) -> dict[str, float]:
        images = report["settings"][setting]["images"]
        return {i["source"]: i["logit"] for per_gen in images.values() for i in per_gen if i["error"] is None}

    clean = logits("clean")
    for setting in ("jpeg75", "crop0.6"):
        perturbed = logits(setting)
        assert perturbed.keys() == clean.keys()
        assert max(abs(perturbed[k] - clean[k]) for k in clean) > 1e-4, setting


def test_crop_is_a_centred_nearest_neighbour_zoom(tmp_path):
    h, w = 40, 60
    ys, xs = np.mgrid[0:h, 0:w]
    pixels = np.stack([ys * 4, xs * 4, np.zeros_like(ys)], axis=-1).astype(np.uint8)  # each pixel names its position
    Image.fromarray(pixels).save(tmp_path / "grid.png")
    out = np.asarray(Image.open(io.BytesIO(crop(0.5).apply(tmp_path / "grid.png"))))
    assert out.shape == (h, w, 3)
    rows, cols = out[..., 0] // 4, out[..., 1] // 4
    # the centre 20×30 region (top 10, left 15), each source pixel repeated 2×2
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 29, 15, 44)
    assert np.array_equal(rows[::2, 0], np.arange(10, 30)) and np.array_equal(cols[0, ::2], np.arange(15, 45))
    assert np.array_equal(rows[::2], rows[1::2]) and np.array_equal(cols[:, ::2], cols[:, 1::2])


def test_jpeg_recompression_loses_more_at_lower_quality(fixture_images):
    path = next(p for p in fixture_images if p.name == "landscape_400x300.png")
    original = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    errors = []
    for quality in (95, 50, 10):
        data = jpeg(quality).apply(path)
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.size == (400, 300)
        errors.append(np.abs(np.asarray(img, dtype=np.float64) - original).mean())
    assert errors[0] < errors[1] < errors[2]


@pytest.mark.server
@pytest.mark.slow
def test_eval_through_the_server_equals_eager(eager_report, tiny_server, labelled_folder, tmp_path):
    args = ["--dataroot", str(labelled_folder), "--url", tiny_server.endpoints.grpc_url]
    code, served = run_eval([*args, "--jpeg-quality", "75", "--crop-ratio", "0.6"], tmp_path / "served.json")
    _, eager = eager_report
    assert code == 1
    assert served["settings"].keys() == eager["settings"].keys()
    for setting in eager["settings"]:
        want, got = metrics_by_gen(eager, setting), metrics_by_gen(served, setting)
        for gen in ("genA", "genB", "mean"):
            for key in ("n_real", "n_fake", "failed", "acc", "ap", "r_acc", "f_acc"):
                assert got[gen][key] == pytest.approx(want[gen][key], abs=1e-9), (setting, gen, key)
        for gen, images in eager["settings"][setting]["images"].items():
            for e, s in zip(images, served["settings"][setting]["images"][gen], strict=True):
                assert e["source"] == s["source"] and (e["error"] is None) == (s["error"] is None)
                if e["error"] is None:
                    assert abs(e["logit"] - s["logit"]) < 1e-4
