"""`d3qe bench-parts`: each exported part's speed against the eager part, in one run
(`benchmarks.export_parts`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from d3qe_serve.serving.inprocess import WeightOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", nargs="+", type=Path, required=True, help="repositories written by `d3qe export`")
    p.add_argument("--checkpoint", help="the checkpoint the repositories were exported from (else their seed)")
    p.add_argument("--vq-checkpoint")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per part, variant and batch (after a warm-up)")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>)")


def run(args: argparse.Namespace) -> int:
    from d3qe_serve.benchmarks.export_parts import bench_export_parts, summary_lines

    results = bench_export_parts(
        repos=args.repo,
        weights=WeightOptions(args.checkpoint, args.vq_checkpoint),
        batches=args.batches,
        repeats=args.repeats,
        out=args.out,
    )
    print("\n".join(summary_lines(results.report)))
    print(f"\nwrote {results.files[0]} and {results.files[1].name}")
    return 0
