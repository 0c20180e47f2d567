"""`d3qe bench-bulk` (maintainers): bulk scoring on Ray Data against in-process scoring, images/s and parity.

The options map onto `d3qe_serve.benchmarks.bulk.bench_bulk`, whose docstring says what is measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", type=Path, help="the export both ways of scoring run (default: build/model_repository)")
    p.add_argument("--images", type=int, default=300, help="fidelity-corpus images scored by every configuration")
    p.add_argument("--small", type=int, default=16, help="images of the short run that measures fixed costs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>)")


def run(args: argparse.Namespace) -> int:
    from d3qe_serve.benchmarks.bulk import bench_bulk

    results = bench_bulk(repo=args.repo, images=args.images, small=args.small, batch_size=args.batch_size, out=args.out)
    report = results.report
    for r in report["rows"]:
        print(
            f"d3qe {r['command']:5} {r['config']:24} {r['end_to_end_images_per_s']:7.2f} images/s end to end, "
            f"{r['steady_images_per_s']:7.2f} steady ({r['steady_images_per_s_per_worker']:.2f} per worker), "
            f"fixed {r['fixed_seconds']:.1f} s"
        )
    print(f"parity, bulk vs score: {report['parity_bulk_vs_score']}")
    print(f"wrote {results.folder}/{', '.join(f.name for f in results.files)}")
    return 0
