"""`d3qe bench-rollout` (maintainers): a rollout and a rollback under load, and the response cache, on a real
tritonserver. The options map onto `d3qe_serve.benchmarks.rollout.bench_rollout`, whose docstring says what is
measured."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="the seeded weights' architecture: tiny (default) or full")
    p.add_argument("--seeds", type=int, nargs=2, default=(0, 1), metavar=("A", "B"), help="the two exports' seeds")
    p.add_argument("--clients", type=int, default=3, help="threads scoring continuously, one image a request")
    p.add_argument("--steady-s", type=float, default=20.0, help="seconds of load before, between and after")
    p.add_argument("--cache-requests", type=int, default=200, help="requests of the cache's stream")
    p.add_argument("--repeat-share", type=float, default=0.5, help="the share of the stream repeating an image")
    p.add_argument("--cache-mb", type=float, default=16.0, help="the response cache's size in that run")
    p.add_argument("--work", type=Path, default=Path("build") / "bench_rollout", help="exports and served copies")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>)")


def run(args: argparse.Namespace) -> int:
    from d3qe_serve.benchmarks.rollout import bench_rollout

    results = bench_rollout(
        preset=args.preset,
        seeds=tuple(args.seeds),
        clients=args.clients,
        steady_s=args.steady_s,
        cache_requests=args.cache_requests,
        repeat_share=args.repeat_share,
        cache_mb=args.cache_mb,
        work=args.work,
        out=args.out,
    )
    r, c = results.report["rollout"], results.report["cache"]
    print(
        f"rollout + rollback under {r['clients']} clients: sent {r['sent']}, answered {r['answered']}, failed "
        f"{r['failed']}, lost {r['lost']}; {r['answers_not_equal_to_their_models_eager_logit']} answers off their "
        f"model's eager logit; p99 {r['swap'].get('p99_ms', float('nan')):.0f} ms swapping vs "
        f"{r['steady'].get('p99_ms', float('nan')):.0f} ms steady; memory {r['rss_mb_one_generation']:.0f} MiB, "
        f"{r['rss_mb_peak_two_generations']:.0f} MiB peak with two generations"
    )
    print(
        f"cache: {c['repeats']} repeats in {c['requests']} requests: {c['cached']['images_per_s']:.2f} images/s cached "
        f"vs {c['uncached']['images_per_s']:.2f} ({c['throughput_ratio_cached_over_uncached']:.2f}x), p50 "
        f"{c['cached']['p50_ms']:.0f} vs {c['uncached']['p50_ms']:.0f} ms; at its limit "
        f"{c['at_limit']['utilisation']} full, {c['at_limit']['evictions']:.0f} evictions"
    )
    print(f"wrote {results.folder}/{', '.join(f.name for f in results.files)}")
    return 0
