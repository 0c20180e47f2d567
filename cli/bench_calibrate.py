"""`d3qe bench-calibrate` (maintainers): the held-out false-positive rate of `d3qe calibrate`'s threshold
against its target, over seeded splits of a labelled set scored once (`benchmarks.calibration`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY, help="the export that scores, in this process")
    from d3qe_serve.benchmarks.calibration import CalibrationRun

    d = CalibrationRun()
    p.add_argument("--images", type=int, default=d.images, help="synthetic images per generator (half real)")
    p.add_argument("--generators", type=int, default=d.generators)
    p.add_argument("--target-fpr", type=float, default=d.target_fpr)
    p.add_argument("--holdout", type=float, default=d.holdout, help="the fraction held out of each split")
    p.add_argument("--splits", type=int, default=d.splits, help="seeded splits, each calibrated and checked")
    p.add_argument("--bootstrap", type=int, default=d.resamples, help="bootstrap resamples per split")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>)")


def run(args: argparse.Namespace) -> int:
    from d3qe_serve.benchmarks.calibration import CalibrationRun, run_calibration, summary_lines

    run_ = CalibrationRun(
        images=args.images,
        generators=args.generators,
        target_fpr=args.target_fpr,
        holdout=args.holdout,
        splits=args.splits,
        resamples=args.bootstrap,
    )
    results = run_calibration(args.repo, run_, args.out)
    print("\n".join(summary_lines(results.report)))
    print(f"wrote {results.folder}/calibrate.json, calibrate.png")
    return 0
