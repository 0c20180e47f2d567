"""`d3qe gpu-run`: the staged GPU run (`benchmarks.gpu_run`), results in $OUT; `--smoke` on this CPU."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from d3qe_serve.benchmarks.gpu_carry import DEFAULT_CARRY
from d3qe_serve.benchmarks.gpu_run import (
    BUDGET_S,
    DEFAULT_OUT,
    DEFAULT_WORK,
    SMOKE_BUDGET_S,
    Context,
    gpu_run,
    write_preflight,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true", help="every stage on this CPU at tiny sizes (what CI runs)")
    p.add_argument("--out", type=Path, help="results folder (default $OUT, else build/gpu-run)")
    p.add_argument("--work", type=Path, help=f"installs and stage outputs (default {DEFAULT_WORK})")
    p.add_argument("--carry", type=Path, default=DEFAULT_CARRY, help="`make gpu-carry`'s folder")
    p.add_argument("--budget", type=float, help=f"seconds for all stages (default {BUDGET_S}; smoke {SMOKE_BUDGET_S})")
    p.add_argument("--fail", nargs="*", default=[], metavar="STAGE", help="make these stages fail (tests the driver)")
    p.add_argument("--preflight", type=Path, metavar="JSON", help=argparse.SUPPRESS)  # the preflight stage itself


def run(args: argparse.Namespace) -> int:
    out = args.out or Path(os.environ.get("OUT") or DEFAULT_OUT)
    ctx = Context(out.resolve(), (args.work or DEFAULT_WORK).resolve(), args.carry.resolve())
    if args.preflight:
        write_preflight(ctx, args.preflight)
        return 0
    results = gpu_run(ctx, smoke=args.smoke, budget=args.budget, fail=args.fail)
    statuses = {name: r["status"] for name, r in results["stages"].items()}
    print(f"gpu run done in {results['run']['seconds']} s: {statuses}; results in {ctx.out}")
    return 0 if all(s in ("ok", "skipped") for s in statuses.values()) else 1
