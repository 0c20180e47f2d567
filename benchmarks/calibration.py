"""`d3qe bench-calibrate`: does the threshold `d3qe calibrate` picks keep its false-positive rate on images it
was not picked on?

A labelled set in upstream's layout is written (`labelled_set`: `benchmarks.bench.synthetic_images`, the
JPEG photographs under `0_real/`, the square PNGs, shaped like ARForensics' generations, under `1_fake/`, in
two generator folders of their own seeds), scored once by an export in this process, then split `splits`
times (seeded, stratified): the threshold is picked on one half (`client.calibrate.calibrate`, target FPR and
bootstrap interval) and its false-positive rate measured on the other. The labels are by construction, and a
model's scores on them mean what they mean (the tiny fixture's, nothing): the false-positive rate depends on
the real images' scores alone, and that is what is measured. Written: calibrate.json (each split's target,
threshold, interval and held-out rates, their summary) and calibrate.png, under `results_dir`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from d3qe_serve.benchmarks import Results, report_header, results_dir, save_figure
from d3qe_serve.benchmarks.bench import synthetic_images
from d3qe_serve.client.calibrate import LabelledScores, calibrate
from d3qe_serve.client.eval import discover, score_dataset
from d3qe_serve.serving.host import machine
from d3qe_serve.serving.inprocess import open_exported
from d3qe_serve.serving.manifest import Manifest


@dataclass(frozen=True)
class CalibrationRun:
    """The set (`images` per generator, `generators` of them), the target and the splits."""

    images: int = 300
    generators: int = 2
    target_fpr: float = 0.05
    holdout: float = 0.5
    splits: int = 20
    resamples: int = 500
    seed: int = 0


def labelled_set(root: Path, images: int, generators: int, seed: int) -> Path:
    """`root/gen<k>/0_real/*.jpg` (photographs) and `root/gen<k>/1_fake/*.png` (square generations)."""
    for k in range(generators):
        for i, data in enumerate(synthetic_images(images, seed=seed + k)):
            fake = data.startswith(b"\x89PNG")
            folder = root / f"gen{k}" / ("1_fake" if fake else "0_real")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:05d}.{'png' if fake else 'jpg'}").write_bytes(data)
    return root


def measure_calibration(repo: Path, run: CalibrationRun, workdir: Path) -> dict:
    """Score the set once with the export at `repo`, then calibrate and check on each split."""
    dataset = discover(labelled_set(workdir / "set", run.images, run.generators, run.seed))
    scored = score_dataset(open_exported(repo), dataset, progress=True)
    scores, failed = LabelledScores.from_scored(scored)
    splits = []
    for s in range(run.splits):
        c = calibrate(scores, target_fpr=run.target_fpr, holdout=run.holdout, resamples=run.resamples, seed=s)
        splits.append(
            {
                "seed": s,
                "threshold": c.threshold,
                "calibration_fpr": c.calibrated.fpr,
                "fpr_interval": asdict(c.interval.fpr),
                "held_out_fpr": c.held_out.fpr,
                "held_out_tpr": c.held_out.tpr,
                "held_out_inside_interval": c.interval.fpr.low <= c.held_out.fpr <= c.interval.fpr.high,
                "n_real_calibration": c.calibrated.n_real,
                "n_real_held_out": c.held_out.n_real,
            }
        )
    held = np.array([s["held_out_fpr"] for s in splits])
    return {
        "settings": {**asdict(run), "repository": str(repo), "manifest_id": Manifest.read(repo).id},
        "set": {"real": int((scores.labels == 0).sum()), "generated": int((scores.labels == 1).sum())},
        "failed": len(failed),
        "summary": {
            "target_fpr": run.target_fpr,
            "held_out_fpr_mean": float(held.mean()),
            "held_out_fpr_min": float(held.min()),
            "held_out_fpr_max": float(held.max()),
            "held_out_inside_interval": sum(s["held_out_inside_interval"] for s in splits),
            "splits": run.splits,
        },
        "splits": splits,
    }


def plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = report["splits"]
    x = np.arange(len(splits))
    low = np.array([s["fpr_interval"]["low"] for s in splits])
    high = np.array([s["fpr_interval"]["high"] for s in splits])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.vlines(x, low, high, color="tab:blue", label="bootstrap 95% interval of the threshold's FPR")
    calibration = [s["calibration_fpr"] for s in splits]
    ax.plot(x, calibration, "_", color="tab:blue", ms=10, label="FPR on the calibration half")
    ax.plot(x, [s["held_out_fpr"] for s in splits], "o", color="black", ms=4, label="FPR on the held-out half")
    ax.axhline(report["summary"]["target_fpr"], color="red", ls="--", lw=0.8, label="target")
    ax.set(xlabel="split (seed)", ylabel="false-positive rate on real images")
    ax.legend(fontsize=8)
    save_figure(fig, path, report["title"])


def run_calibration(repo: Path, run: CalibrationRun = CalibrationRun(), out: Path | None = None) -> Results:
    """`measure_calibration`, written to calibrate.json and calibrate.png in `out` (default `results_dir`)."""
    import tempfile

    info = machine("cpu")
    out_dir = results_dir(info, out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="d3qe-calibrate-") as workdir:
        measured = measure_calibration(repo, run, Path(workdir))
    report = {**report_header(f"d3qe calibrate, held-out FPR at target {run.target_fpr}", info), **measured}
    (out_dir / "calibrate.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(out_dir / "calibrate.png", report)
    return Results.written(report, out_dir, "calibrate.json", "calibrate.png")


def summary_lines(report: dict) -> list[str]:
    s = report["summary"]
    return [
        f"{report['set']['real']} real, {report['set']['generated']} generated images; {s['splits']} splits in halves",
        f"target FPR {s['target_fpr']}: held-out FPR mean {s['held_out_fpr_mean']:.4f} "
        f"(min {s['held_out_fpr_min']:.4f}, max {s['held_out_fpr_max']:.4f}); inside the bootstrap interval in "
        f"{s['held_out_inside_interval']} of {s['splits']}",
    ]
