"""`d3qe fidelity`: what each runtime and precision does to the scores, on the fidelity corpus
(`benchmarks.fidelity`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d3qe_serve.cli.options import add_weight_arguments, weight_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", type=Path, nargs="*", default=[], help="exported repositories, run in-process")
    p.add_argument(
        "--torch",
        nargs="*",
        default=[],
        metavar="PRECISION[:N]",
        help="the eager model's parts in these precisions on --device: fp32 (on CUDA held to fp32, the strict "
        "parity check), fp16, bf16, tf32 (CUDA only); ':N' runs an evenly spread subset of N images (fp16 is slow "
        "on CPUs)",
    )
    p.add_argument("--server", action="store_true", help="also score through a server on the first --repo")
    p.add_argument("--url", help="score through this running server instead of starting one")
    p.add_argument("--server-limit", type=int, help="served: an evenly spread subset of N of the images")
    p.add_argument("--limit", type=int, help="an evenly spread subset of N corpus images (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the in-process configurations run")
    p.add_argument("--timeout", type=float, default=600.0, help="served: seconds per request")
    add_weight_arguments(p)
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>)")


def _precisions(specs: list[str], device: str) -> list[tuple[str, int | None]]:
    """--torch's PRECISION[:N] as (precision, N or None); tf32 dropped, with a note, off CUDA."""
    precisions = []
    for spec in specs:
        precision, _, limit = spec.partition(":")
        if precision == "tf32" and not device.startswith("cuda"):
            print("d3qe fidelity: --torch tf32 is a CUDA setting: skipped on the CPU", file=sys.stderr)
            continue
        precisions.append((precision, int(limit) if limit else None))
    return precisions


def run(args: argparse.Namespace) -> int:
    from d3qe_serve.benchmarks.fidelity import fidelity, markdown

    results = fidelity(
        weights=weight_options(args),
        repos=args.repo,
        precisions=_precisions(args.torch, args.device),
        server=args.server,
        url=args.url,
        server_limit=args.server_limit,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        timeout=args.timeout,
        out=args.out,
    )
    print(markdown(results.report))
    print(f"wrote {results.folder}/fidelity.json, fidelity.md, fidelity.png")
    return 0
