"""`d3qe score`: score image files through the Triton server (default) or an in-process runtime the CLI offers."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from client.grpc_client import DEFAULT_MODEL, DEFAULT_URL, D3QEClient, ModelMismatchError, ServerNotReadyError
from client.results import DEFAULT_THRESHOLD, InProcessRuntime, Scorer, ScoreResult

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def expand_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given (whatever their suffix: a bad one gets its own error); folders recursively, images only."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield p


def write_results(results: Iterable[ScoreResult], fmt: str, out: TextIO | None = None) -> int:
    """Print one row per image (to stdout as it is at the call); returns the number of failed images."""
    out = out or sys.stdout
    failed = 0
    writer = None
    for r in results:
        failed += not r.ok
        if fmt == "json":
            print(json.dumps(r.as_dict()), file=out, flush=True)
        elif fmt == "csv":
            if writer is None:
                writer = csv.DictWriter(out, fieldnames=list(r.as_dict()))
                writer.writeheader()
            writer.writerow(r.as_dict())
        elif r.ok:
            print(f"{r.source}\tlogit={r.logit:+.4f}\tp={r.probability:.4f}\t{r.verdict}", file=out, flush=True)
        else:
            print(f"{r.source}\tERROR: {r.error}", file=out, flush=True)
    return failed


def add_runtime_arguments(p: argparse.ArgumentParser, in_process: Sequence[InProcessRuntime] = ()) -> None:
    """Where the model runs: options shared by `d3qe score` and `d3qe eval`."""
    p.add_argument(
        "--runtime",
        choices=["server", *(r.name for r in in_process)],
        default="server",
        help="the Triton server over gRPC (default)" + "".join(f"; {r.name}: {r.help}" for r in in_process),
    )
    p.add_argument("--url", default=DEFAULT_URL, help="server: gRPC address host:port")
    p.add_argument("--model", default=DEFAULT_MODEL, help="server: the ensemble taking encoded images")
    p.add_argument("--concurrency", type=int, default=4, help="server: requests in flight")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="server: seconds to wait per request (the server still finishes it)",
    )
    p.add_argument("--ready-timeout", type=float, default=30.0, help="server: seconds to wait for it to be ready")
    p.add_argument(
        "--shared-memory",
        action="store_true",
        help="server: send images through system shared memory (client and server on one host)",
    )
    for runtime in in_process:
        runtime.add_arguments(p)
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="P(generated) for the verdict")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass or per request")


@contextlib.contextmanager
def open_runtime(args: argparse.Namespace, in_process: Sequence[InProcessRuntime] = ()) -> Iterator[Scorer]:
    """The runtime `args` ask for, ready to score; the server's readiness and interface are checked first."""
    for runtime in in_process:
        if args.runtime == runtime.name:
            with runtime.open(args) as score:
                yield score
            return
    with D3QEClient(
        args.url,
        args.model,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        timeout=args.timeout,
        threshold=args.threshold,
        shared_memory=args.shared_memory,
    ) as client:
        client.wait_until_ready(timeout=args.ready_timeout)
        yield client.score


def add_arguments(p: argparse.ArgumentParser, in_process: Sequence[InProcessRuntime] = ()) -> None:
    p.add_argument("paths", nargs="+", help="image files and folders (searched recursively)")
    add_runtime_arguments(p, in_process)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="fmt", action="store_const", const="json", help="one JSON object per line")
    fmt.add_argument("--csv", dest="fmt", action="store_const", const="csv")
    p.set_defaults(fmt="text")


def run(args: argparse.Namespace, in_process: Sequence[InProcessRuntime] = ()) -> int:
    try:
        with open_runtime(args, in_process) as score:
            failed = write_results(score((str(p), p) for p in expand_paths(args.paths)), args.fmt)
    except (ServerNotReadyError, ModelMismatchError) as e:
        print(f"d3qe score: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0
