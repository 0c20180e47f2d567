"""`d3qe gpu-run`: the staged GPU run (`benchmarks.gpu_run`), results in $OUT; `--smoke` on this CPU."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from d3qe_serve.benchmarks.gpu_carry import DEFAULT_CARRY
from d3qe_serve.benchmarks.gpu_run import (
    DEFAULT_OUT,
    DEFAULT_WORK,
    RUN_BUDGET_S,
    SMOKE_BUDGET_S,
    Context,
    gpu_run,
    run_driver_stage,
)
from d3qe_serve.errors import InputError


def stage_limit(text: str) -> tuple[str, float]:
    """NAME=SECONDS, as `--limits` takes it."""
    name, sep, seconds = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STAGE=SECONDS, e.g. compiled=300") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true", help="every stage on this CPU at tiny sizes (what CI runs)")
    p.add_argument("--out", type=Path, help="results folder (default $OUT, else build/gpu-run)")
    p.add_argument("--work", type=Path, help=f"installs and stage outputs (default {DEFAULT_WORK})")
    p.add_argument("--carry", type=Path, default=DEFAULT_CARRY, help="`make gpu-carry`'s folder")
    p.add_argument(
        "--budget", type=float, help=f"seconds for all stages (default {RUN_BUDGET_S}; smoke {SMOKE_BUDGET_S})"
    )
    p.add_argument(
        "--stages", nargs="+", metavar="STAGE", help="run these alone (a rerun: earlier stages on this machine count)"
    )
    p.add_argument("--limits", nargs="+", type=stage_limit, default=[], metavar="STAGE=S", help="stage time limits")
    p.add_argument("--fail", nargs="*", default=[], metavar="STAGE", help="make these stages fail (tests the driver)")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # one stage the driver implements, run by the driver itself


def run(args: argparse.Namespace) -> int:
    out = args.out or Path(os.environ.get("OUT") or DEFAULT_OUT)
    ctx = Context(out.resolve(), (args.work or DEFAULT_WORK).resolve(), args.carry.resolve())
    if args.stage:
        return run_driver_stage(ctx, args.stage, args.smoke)
    limits = dict(args.limits)
    if len(limits) != len(args.limits):
        raise InputError("--limits: a stage named twice")
    results = gpu_run(ctx, smoke=args.smoke, budget=args.budget, fail=args.fail, only=args.stages, limits=limits)
    statuses = {name: r["status"] for name, r in results["stages"].items()}
    print(f"gpu run done in {results['run']['seconds']} s: {statuses}; results in {ctx.out}")
    return 0 if all(s in ("ok", "skipped") for s in statuses.values()) else 1
