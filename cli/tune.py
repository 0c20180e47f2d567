"""`d3qe tune`: each part's runtime and precision chosen by measurement within named fidelity bounds, and the
repository exported with that plan (`export.tune`); the figure from `benchmarks.tuning`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d3qe_serve.cli.options import add_weight_arguments, weight_options
from d3qe_serve.errors import InputError, ValidationError
from d3qe_serve.export.bounds import BOUNDS
from d3qe_serve.export.calibration import CALIBRATION_IMAGES
from d3qe_serve.export.plan import PartChoice
from d3qe_serve.export.tune import (
    CANDIDATES,
    DEFAULT_BATCHES,
    DEFAULT_LIMIT,
    DEFAULT_ROUNDS,
    DEFAULT_RUNS,
    TUNING_JSON,
    device_kind,
    summary_lines,
    tune,
)

DEFAULT_OUT = Path("build") / "model_repository_tuned"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_weight_arguments(p)
    p.add_argument(
        "--bounds",
        choices=list(BOUNDS),
        default="default",
        help="; ".join(f"{b.name}: {b.description}" for b in BOUNDS.values()).replace("%", "%%"),  # argparse's %
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Triton repository to write")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="corpus images each candidate is judged on")
    p.add_argument(
        "--calibration",
        type=int,
        default=CALIBRATION_IMAGES,
        help="corpus images static int8 is calibrated on (held apart from those judged)",
    )
    p.add_argument("--batch", type=int, nargs="+", default=list(DEFAULT_BATCHES), help="batch sizes timed")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N: where the candidates run")
    p.add_argument("--threads", type=int, help="threads per part (default: a served instance's share of the cores)")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="timed rounds (the median is kept)")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="calls per candidate and batch in a round")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the artifacts take")
    p.add_argument(
        "--candidate",
        nargs=3,
        action="append",
        metavar=("PART", "RUNTIME", "PRECISION"),
        help="a candidate of PART; given for a part, these replace its default candidates (export/tune.py CANDIDATES)",
    )


def _candidates(given: list[list[str]] | None, device: str) -> dict[str, tuple[PartChoice, ...]]:
    candidates: dict[str, list[PartChoice]] = {}
    for part, runtime, precision in given or []:
        try:
            candidates.setdefault(part, []).append(PartChoice(runtime, precision))
        except ValueError as e:
            raise InputError(f"--candidate {part} {runtime} {precision}: {e}") from None
    return {**CANDIDATES[device_kind(device)], **{p: tuple(c) for p, c in candidates.items()}}


def run(args: argparse.Namespace) -> int:
    from d3qe_serve.benchmarks.tuning import plot_tuning

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    weights = weight_options(args)
    try:
        manifest = tune(
            weights.load(),
            args.out,
            weights=weights,
            bounds=args.bounds,
            limit=args.limit,
            calibration=args.calibration,
            batches=args.batch,
            device=args.device,
            threads=args.threads,
            rounds=args.rounds,
            runs=args.runs,
            max_batch=args.max_batch,
            candidates=_candidates(args.candidate, args.device),
            log=log,
        )
    except ValidationError as e:
        log(f"d3qe tune: the chosen plan FAILED validation (every measurement is in {args.out / TUNING_JSON})\n{e}")
        return 1
    record = manifest.tuning
    title = f"d3qe tune `{args.bounds}`: {manifest.machine['cpu']} ({manifest.machine['cores']} cores)"
    figure = plot_tuning(record, args.out / "tuning.png", title)
    print("\n".join(summary_lines(record)))
    print(
        f"wrote {args.out}: manifest.json (its `tuning` record), {TUNING_JSON}, {figure.name}; served by "
        f"`d3qe serve --model-repository {args.out}`"
    )
    return 0
