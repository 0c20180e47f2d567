"""`d3qe bench-attention`: D³AT's attention, the released math vs SDPA vs the fused kernel
(`benchmarks.attention`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from d3qe_serve.benchmarks import RESULTS
from d3qe_serve.benchmarks.attention import DTYPES, bench_attention, summary_lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present, else cpu")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: fp16 bf16 on cuda, fp32 on cpu")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed calls per case")
    p.add_argument("--out", type=Path, default=RESULTS)


def run(args: argparse.Namespace) -> int:
    results = bench_attention(
        device=args.device,
        dtypes=args.dtypes,
        batches=args.batches,
        length=args.length,
        heads=args.heads,
        head_dim=args.head_dim,
        min_run_time=args.min_run_time,
        out=args.out,
    )
    print("\n".join(summary_lines(results.report)))
    stem = results.files[0].with_suffix("")
    print(f"wrote {stem}.json and {stem}.png")
    return 0
