"""`d3qe bench-reward`: RL-sized reward calls, served vs the eager model in-process (`benchmarks.reward`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from d3qe_serve.cli.options import add_weight_arguments, weight_options
from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY

DEFAULT_CALLS = 2  # timed calls of a size given without ':CALLS'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY, help="served (and its weights)")
    p.add_argument("--url", help="a running server instead of one started on --repo")
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["64:2", "512:1"],
        metavar="N[:CALLS]",
        help=f"images per call, and timed calls of that size per runtime (default {DEFAULT_CALLS}), after one "
        "warm-up image",
    )
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    add_weight_arguments(p)
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>)")


def _size(spec: str) -> tuple[int, int]:
    n, _, calls = spec.partition(":")
    return int(n), int(calls or DEFAULT_CALLS)


def run(args: argparse.Namespace) -> int:
    from d3qe_serve.benchmarks.reward import bench_reward, summary_lines

    results = bench_reward(
        repo=args.repo,
        url=args.url,
        sizes=[_size(spec) for spec in args.sizes],
        image_size=args.image_size,
        chunk_size=args.chunk_size,
        concurrency=args.concurrency,
        weights=weight_options(args),
        out=args.out,
    )
    print("\n".join(summary_lines(results.report)))
    print(f"wrote {results.folder}/reward.json, reward.png")
    return 0
