"""`d3qe bench`: eager vs each exported runtime in-process vs Triton over gRPC (`benchmarks.bench`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from d3qe_serve.benchmarks import RESULTS
from d3qe_serve.benchmarks.bench import PROFILES, bench, markdown
from d3qe_serve.cli.options import add_weight_arguments, weight_options
from d3qe_serve.client.grpc_client import DEFAULT_MODEL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="sizes and device for the machine")
    p.add_argument(
        "--repo",
        type=Path,
        nargs="*",
        default=[Path("model_repository")],
        help="exported repositories (d3qe export --out): each runs in-process; the first is served",
    )
    p.add_argument("--url", help="bench this running server instead of starting one on the first --repo")
    p.add_argument(
        "--model",
        nargs="+",
        default=[DEFAULT_MODEL],
        help="served models, each at every client count: d3qe takes encoded images, d3qe_rgb decoded pixels",
    )
    add_weight_arguments(p, role="eager reference, as exported: ")
    p.add_argument("--images", type=int, help="override the profile's image count")
    p.add_argument("--concurrency", type=int, nargs="+", help="override the profile's client counts")
    p.add_argument(
        "--eager-batch", type=int, nargs="+", help="override the profile's eager batch sizes (the fastest is × 1.00)"
    )
    p.add_argument("--serve-each", action="store_true", help="serve every --repo in turn, not only the first")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-server", dest="server", action="store_false", help="skip the served measurements")
    p.add_argument(
        "--compile",
        action="store_true",
        help="in-process: torch-runtime parts through torch.compile (CUDA graphs on a GPU), as `export --compile` "
        "serves them",
    )
    p.add_argument("--out", type=Path, help=f"results folder (default {RESULTS}/<machine>-<date>)")


def run(args: argparse.Namespace) -> int:
    profile = PROFILES[args.profile]
    if args.images:
        profile = dataclasses.replace(profile, images=args.images)
    if args.concurrency:
        profile = dataclasses.replace(profile, concurrency=tuple(args.concurrency))
    if args.eager_batch:
        profile = dataclasses.replace(profile, eager_batches=tuple(args.eager_batch))
    results = bench(
        profile=profile,
        repos=args.repo,
        weights=weight_options(args),
        url=args.url,
        models=args.model,
        server=args.server,
        timeout=args.timeout,
        compile=args.compile,
        serve_each=args.serve_each,
        out=args.out,
    )
    print(markdown(results.report))
    print(f"wrote {results.folder}/bench.json, bench.md, bench.png")
    return 0
