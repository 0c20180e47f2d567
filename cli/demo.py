"""`d3qe demo`: the whole product once: export, serve, score sample images over gRPC, compare with eager, stop.

Without `--checkpoint` the full-size architecture gets seeded random weights (the scores mean nothing;
the pipeline and its numerics are the real ones). An existing export of the same weights is reused.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from d3qe_serve.cli.options import add_weight_arguments, weight_options
from d3qe_serve.client.results import ScoreResult
from d3qe_serve.contract import LOGIT
from d3qe_serve.errors import ServerError
from d3qe_serve.serving.endpoints import free_endpoints
from d3qe_serve.serving.server import TritonServer
from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY

SAMPLE_IMAGES = Path(__file__).resolve().parent / "samples"  # package data: the tiny fixture's seven images


def _say(line: str) -> None:
    print(line, flush=True)


def compare(served: list[ScoreResult], eager: list[ScoreResult], tolerance: float) -> tuple[float, int, bool]:
    """Print both scores per image; returns (max |Δlogit|, verdicts agreeing, everything within tolerance)."""
    _say(f"{'image':32} {'served logit':>13} {'eager logit':>12} {'|Δ|':>9}  verdict")
    worst, agree, ok = 0.0, 0, True
    for s, e in zip(served, eager, strict=True):
        name = Path(s.source).name
        if not (s.ok and e.ok):
            _say(f"{name:32} ERROR: {s.error or e.error}")
            ok = False
            continue
        delta = abs(s.logit - e.logit)
        worst = max(worst, delta)
        agree += s.verdict == e.verdict
        same = "same" if s.verdict == e.verdict else f"DIFFERS (eager: {e.verdict})"
        _say(f"{name:32} {s.logit:+13.6f} {e.logit:+12.6f} {delta:9.2e}  {s.verdict}, {same}")
    return worst, agree, ok and worst <= tolerance and agree == len(served)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_weight_arguments(p)
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="where the export goes")
    p.add_argument("--images", nargs="+", type=Path, default=[SAMPLE_IMAGES], help="images or folders to score")
    p.add_argument("--reexport", action="store_true", help="export even if the repository holds these weights")


def run(args: argparse.Namespace) -> int:
    from d3qe_serve.client.grpc_client import D3QEClient
    from d3qe_serve.client.score import expand_paths
    from d3qe_serve.errors import CheckpointError, ValidationError
    from d3qe_serve.export.driver import export_repository, reusable_export
    from d3qe_serve.export.validate import TOLERANCES
    from d3qe_serve.serving.inprocess import score_eager
    from d3qe_serve.serving.repository import write_repository

    repo = args.model_repository.resolve()
    items = [(str(p), p) for p in expand_paths(args.images)]
    weights = weight_options(args)
    try:
        model = weights.load()
    except CheckpointError as e:
        print(f"d3qe demo: {e}", file=sys.stderr)
        return 2
    described = (
        weights.checkpoint or f"seeded random weights ({weights.preset}, seed {weights.seed}: scores mean nothing)"
    )
    manifest = None if args.reexport else reusable_export(repo, weights)
    if manifest is None:
        _say(f"[1/4] exporting {described} to {repo} (ONNX Runtime fp32, validated against eager) …")
        try:
            manifest = export_repository(model, repo, weights=weights, log=_say)
        except ValidationError as e:
            print(f"d3qe demo: the export failed validation:\n{e}", file=sys.stderr)
            return 1
    else:
        _say(f"[1/4] {repo} already holds a validated export of {described}: reused")
        write_repository(repo, manifest)  # configs and python models as this version of the code writes them
    endpoints = free_endpoints()
    _say(f"[2/4] starting tritonserver on {endpoints.grpc_url} (gRPC) …")
    start = time.perf_counter()
    try:
        with TritonServer(repo, endpoints) as server:
            ready = time.perf_counter() - start
            _say(f"      Triton {server.version()} ready in {ready:.0f} s: {', '.join(server.models)}")
            _say(f"[3/4] scoring {len(items)} images through the `d3qe` ensemble over gRPC:")
            with D3QEClient(endpoints.grpc_url) as client:
                served = []
                for r in client.score(items):
                    served.append(r)
                    result = f"logit {r.logit:+.6f}  p {r.probability:.4f}  {r.verdict}" if r.ok else f"ERROR {r.error}"
                    _say(f"      {Path(r.source).name:32} {result}")
            _say("      stopping the server …")
    except ServerError as e:
        print(f"d3qe demo: the server failed: {e}", file=sys.stderr)
        return 1
    _say("[4/4] the eager PyTorch model on the same images:")
    eager = list(score_eager(model, items))
    tolerance = TOLERANCES[manifest.precision].max_abs[LOGIT]  # the export's own, per precision
    worst, agree, ok = compare(served, eager, tolerance)
    _say(
        f"max |Δlogit| served vs eager: {worst:.2e} (tolerance {tolerance:g}); "
        f"verdicts agree on {agree}/{len(items)} images — {'OK' if ok else 'MISMATCH'}"
    )
    return 0 if ok else 1
