"""`d3qe eval`: the paper's evaluation of a labelled folder (`client.eval`), clean and under robustness sweeps,
through `d3qe score`'s runtimes; a table per setting, the summary, and with `--out` every image's score."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from d3qe_serve.cli.options import add_runtime_arguments, open_scorer
from d3qe_serve.client.eval import (
    Metrics,
    crop,
    discover,
    evaluate,
    format_summary,
    format_table,
    jpeg,
    require_metrics,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataroot", type=Path, required=True, help="DIR/<generator>/0_real|1_fake/* or DIR/0_real|1_fake/*"
    )
    p.add_argument("--generators", nargs="+", help="only these subfolders of DIR (default: all)")
    add_runtime_arguments(p)
    p.add_argument("--jpeg-quality", type=int, nargs="+", default=[], help="robustness: JPEG qualities, e.g. 95 75 50")
    p.add_argument("--crop-ratio", type=float, nargs="+", default=[], help="robustness: crop ratios, e.g. 0.9 0.5")
    p.add_argument("--out", type=Path, help="write metrics and every image's score to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    require_metrics()
    dataset = discover(args.dataroot, args.generators)
    perturbations = [None, *map(jpeg, args.jpeg_quality), *map(crop, args.crop_ratio)]
    runtime = args.url if args.runtime == "server" else args.runtime
    settings: dict[str, list[Metrics]] = {}
    report = {"dataroot": str(args.dataroot), "runtime": args.runtime, "url": args.url, "settings": {}}
    failed = 0
    with open_scorer(args) as score:
        for perturbation in perturbations:
            # no --threshold: the one the verdicts used (the served or exported operating point)
            setting = evaluate(score, dataset, perturbation, args.threshold, args.progress)
            settings[setting.name] = setting.rows
            print(
                format_table(f"D³QE on {args.dataroot} ({runtime}, {setting.name})", setting.rows) + "\n",
                flush=True,
            )
            for r in setting.failures:
                print(f"d3qe eval: {setting.name}: {r.source}: {r.error}", file=sys.stderr)
            failed += sum(r.failed for r in setting.rows)
            report["settings"][setting.name] = setting.as_dict()
    print(format_summary(settings))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, allow_nan=False))
    return 1 if failed else 0
