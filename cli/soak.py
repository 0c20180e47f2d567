"""`d3qe soak`: good and bad requests above capacity for a bounded time, every one accounted for
(`benchmarks.soak`). Exit status 1 unless no request was wrong, unexpected, duplicated or lost."""

from __future__ import annotations

import argparse
from pathlib import Path

from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="served on free loopback ports")
    p.add_argument("--url", help="soak this running server instead (loopback)")
    p.add_argument("--seconds", type=float, default=180.0, help="how long requests are sent")
    p.add_argument("--rate", type=float, default=20.0, help="requests sent per second (above capacity: overload)")
    p.add_argument("--bad-fraction", type=float, default=0.3, help="share of requests drawn from the bad cases")
    p.add_argument("--max-outstanding", type=int, default=512, help="unanswered requests before the sender waits")
    p.add_argument("--drain-timeout", type=float, default=600.0, help="seconds to wait for answers after sending")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>)")


def run(args: argparse.Namespace) -> int:
    from d3qe_serve.benchmarks.soak import Load, accounted_for, run_soak, summary_lines

    load = Load(
        seconds=args.seconds,
        rate=args.rate,
        bad_fraction=args.bad_fraction,
        max_outstanding=args.max_outstanding,
        drain_timeout=args.drain_timeout,
        seed=args.seed,
    )
    results = run_soak(load=load, repository=args.model_repository, url=args.url, out=args.out)
    print("\n".join(summary_lines(results.report)))
    print(f"wrote {results.folder}/soak.json, soak.png")
    return 0 if accounted_for(results.report) else 1
