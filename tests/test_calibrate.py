"""`d3qe calibrate` and its math (`client.calibrate`): thresholds against independent truth (counts on
hand-made and synthetic scores, the fixture's reference logits), the bootstrap interval against held-out data,
the operating point written into an export and used by `d3qe eval`, and the bad input it refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from d3qe_serve.cli.main import main
from d3qe_serve.client.calibrate import (
    LabelledScores,
    Rates,
    calibrate,
    threshold_at_fpr,
    threshold_best_accuracy,
)
from d3qe_serve.errors import InputError
from d3qe_serve.serving.manifest import Manifest
from d3qe_serve.serving.operating_point import OperatingPoint
from tests.test_eval import LAYOUT, labelled_folder  # noqa: F401 (a fixture)


def synthetic(n_real: int, n_fake: int, seed: int, generators: int = 1) -> LabelledScores:
    """Real scores ~ Beta(2, 5), generated ~ Beta(5, 2), generators taking turns."""
    rng = np.random.default_rng(seed)
    probs = np.concatenate([rng.beta(2, 5, n_real), rng.beta(5, 2, n_fake)])
    labels = np.concatenate([np.zeros(n_real, np.int64), np.ones(n_fake, np.int64)])
    gens = np.array([f"g{i % generators}" for i in range(n_real + n_fake)], dtype=object)
    return LabelledScores(labels, probs, gens)


def test_threshold_at_fpr_is_the_lowest_that_keeps_the_rate():
    reals = np.arange(1, 101) / 101  # 100 distinct scores
    for target in (0.0, 0.01, 0.05, 0.1, 0.5):
        t = threshold_at_fpr(reals, target)
        assert np.mean(reals > t) <= target
        lower = reals[reals < t]
        assert lower.size == 0 or np.mean(reals > lower.max()) > target  # any lower threshold breaks it
    assert np.mean(reals > threshold_at_fpr(reals, 0.05)) == 0.05
    assert 0 < threshold_at_fpr(np.ones(10), 0.1) < 1  # saturated scores: still inside (0, 1)
    with pytest.raises(InputError, match="outside"):
        threshold_at_fpr(reals, 1.0)


def test_best_accuracy_separates_separable_scores_and_counts_right():
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.6, 0.9])
    t = threshold_best_accuracy(labels, probs)
    assert 0.3 <= t < 0.6 and Rates.at(LabelledScores(labels, probs, np.zeros(5, object)), t).accuracy == 1.0
    labels, probs = np.array([0, 1, 0, 1]), np.array([0.2, 0.4, 0.6, 0.8])  # best: 3 of 4, below 0.4 or above 0.6
    t = threshold_best_accuracy(labels, probs)
    assert np.mean((probs > t) == labels) == 0.75


def test_held_out_fpr_is_within_the_bootstrap_interval():
    """The interval is for the chosen threshold's false-positive rate: a large held-out set (its rate ≈ the true
    one) falls inside it about as often as the confidence says."""
    inside, errors = 0, []
    for seed in range(60):
        cal = calibrate(synthetic(1000, 1000, seed), target_fpr=0.05, resamples=300, seed=seed)
        held = synthetic(50_000, 10, 10_000 + seed)
        fpr = float(np.mean(held.probs[held.labels == 0] > cal.threshold))
        inside += cal.interval.fpr.low <= fpr <= cal.interval.fpr.high
        errors.append(fpr - 0.05)
        assert cal.calibrated.fpr <= 0.05
        assert cal.interval.threshold.low <= cal.threshold <= cal.interval.threshold.high
    assert inside >= 0.85 * 60, inside
    assert abs(np.mean(errors)) < 0.005 and np.max(np.abs(errors)) < 0.03


def test_holdout_split_is_stratified_seeded_and_reported():
    scores = synthetic(400, 200, 0, generators=2)
    a, b = scores.split(0.25, seed=3)
    assert len(a) + len(b) == len(scores) and len(b) == 150
    for g in ("g0", "g1"):
        for label in (0, 1):
            n = int(((scores.generators == g) & (scores.labels == label)).sum())
            assert int(((b.generators == g) & (b.labels == label)).sum()) == round(0.25 * n)
    assert np.array_equal(scores.split(0.25, seed=3)[1].probs, b.probs)
    cal = calibrate(scores, target_fpr=0.1, holdout=0.25, resamples=50, seed=3)
    assert cal.held_out.n_real == 100 and cal.held_out.n_fake == 50
    assert set(cal.calibrated.caught_per_generator) == {"g0", "g1"}
    assert json.loads(json.dumps(cal.as_dict()))["threshold"] == cal.threshold


def test_a_set_without_both_classes_is_refused():
    only_real = LabelledScores(np.zeros(5, np.int64), np.linspace(0.1, 0.5, 5), np.zeros(5, object))
    with pytest.raises(InputError, match=r"no scored generated images \(1_fake/\)"):
        calibrate(only_real)
    with pytest.raises(InputError, match="outside"):
        OperatingPoint(1.5)


def _fixture_probs(expected) -> dict[str, float]:
    logits = expected["image_logits_reference"][:, 0].astype(np.float64)
    return dict(zip(map(str, expected["image_names"]), 1 / (1 + np.exp(-logits)), strict=True))


def test_calibrate_picks_the_threshold_the_fixtures_logits_give(labelled_folder, tiny_checkpoint, expected, tmp_path):  # noqa: F811
    out = tmp_path / "cal"
    args = ["calibrate", "--dataroot", str(labelled_folder), "--runtime", "eager", "--checkpoint", str(tiny_checkpoint)]
    assert main([*args, "--target-fpr", "0.34", "--bootstrap", "100", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "calibration.json").read_text())
    probs = _fixture_probs(expected)
    reals = sorted((p for n, p in probs.items() if LAYOUT[n][1] == "0_real"), reverse=True)
    assert len(reals) == 3 and record["threshold"] == pytest.approx(reals[1], abs=1e-5)  # one of three above: 0.33
    caught = record["calibrated"]["caught_per_generator"]
    for gen in ("genA", "genB"):
        fakes = [p for n, p in probs.items() if LAYOUT[n] == (gen, "1_fake")]
        assert caught[gen] == pytest.approx(np.mean(np.array(fakes) > record["threshold"]))
    assert record["failed"] == 1  # broken.png, left out
    assert len(record["curves"]["fpr"]) == len(record["curves"]["tpr"]) >= 2
    assert (out / "roc.png").stat().st_size > 0 and (out / "pr.png").stat().st_size > 0


def test_a_folder_without_generated_images_is_a_clear_error(labelled_folder, tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    only_real = tmp_path / "set"
    shutil.copytree(labelled_folder / "genA" / "0_real", only_real / "0_real")
    args = ["calibrate", "--dataroot", str(only_real), "--runtime", "eager", "--checkpoint", str(tiny_checkpoint)]
    assert main([*args, "--out", str(tmp_path / "cal"), "--no-progress"]) == 2
    assert "no scored generated images (1_fake/)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_written_threshold_is_the_exports_and_eval_uses_it(tiny_repository, labelled_folder, tmp_path, capsys):  # noqa: F811
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    assert main(["calibrate", "--manual", "1.5", "--write", str(repo)]) == 2
    assert "outside (0, 1)" in capsys.readouterr().err
    assert not (repo / "operating_point.json").exists()

    args = ["--dataroot", str(labelled_folder), "--runtime", "exported", "--repo", str(repo), "--no-progress"]
    cal_args = ["calibrate", *args, "--method", "best_accuracy", "--bootstrap", "50", "--out", str(tmp_path / "c")]
    assert main([*cal_args, "--write", str(repo)]) == 0
    point = OperatingPoint.read(repo)
    record = json.loads((tmp_path / "c" / "calibration.json").read_text())
    assert point.method == "best_accuracy" and point.threshold == record["threshold"]
    assert point.manifest_id == Manifest.read(repo).id == record["manifest_id"]

    assert main(["eval", *args, "--out", str(tmp_path / "eval.json")]) == 1  # broken.png is reported
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["settings"]["clean"]["threshold"] == point.threshold
    scored = [i for imgs in report["settings"]["clean"]["images"].values() for i in imgs if i["error"] is None]
    assert all(i["verdict"] == ("generated" if i["probability"] > point.threshold else "real") for i in scored)
    assert main(["eval", *args, "--threshold", "0.5", "--out", str(tmp_path / "e2.json")]) == 1
    assert json.loads((tmp_path / "e2.json").read_text())["settings"]["clean"]["threshold"] == 0.5
