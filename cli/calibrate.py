"""`d3qe calibrate`: the operating point (threshold) picked on a labelled folder (`client.calibrate`), its curves
written, and with `--write REPO` stored in an export (`serving.operating_point`) so that serving it uses it."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from d3qe_serve.cli.options import add_runtime_arguments, open_scorer
from d3qe_serve.client.calibrate import METHODS, Calibration, LabelledScores, calibrate, plot_curves
from d3qe_serve.client.eval import discover, require_metrics, score_dataset
from d3qe_serve.errors import InputError, ManifestError, NotFoundError
from d3qe_serve.serving.manifest import Manifest
from d3qe_serve.serving.operating_point import OperatingPoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataroot", type=Path, help="DIR/<generator>/0_real|1_fake/* or DIR/0_real|1_fake/*")
    p.add_argument("--generators", nargs="+", help="only these subfolders of DIR (default: all)")
    add_runtime_arguments(p)
    p.add_argument("--method", choices=METHODS, default="target_fpr", help="how the threshold is picked")
    p.add_argument(
        "--target-fpr", type=float, default=0.05, help="target_fpr: the false-positive rate on real images aimed at"
    )
    p.add_argument("--holdout", type=float, help="a fraction held out (seeded): the threshold's rates on it reported")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap and of the held-out split")
    p.add_argument("--out", type=Path, default=Path("calibration"), help="folder for calibration.json, roc.png, pr.png")
    p.add_argument("--write", type=Path, metavar="REPO", help="store the threshold in this export's operating point")
    p.add_argument(
        "--manual", type=float, metavar="THRESHOLD", help="no data: store THRESHOLD as REPO's operating point (--write)"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _manifest_id(repo: Path) -> str:
    try:
        return Manifest.read(repo).id
    except FileNotFoundError as e:
        raise NotFoundError(str(e)) from e


def _scored_by(results_ids: set[str | None], args: argparse.Namespace) -> str | None:
    """The manifest id of the export that scored the set: the answers' (served), the --repo's (exported)."""
    if args.runtime == "exported":
        from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY

        return _manifest_id(args.repo or DEFAULT_REPOSITORY)
    ids = {i for i in results_ids if i}
    if len(ids) > 1:
        raise InputError(f"the set was scored by several exports {sorted(ids)} (a rollout meanwhile?): run it again")
    return ids.pop() if ids else None


def _write(args: argparse.Namespace, point: OperatingPoint) -> Path:
    repo_id = _manifest_id(args.write)
    if point.manifest_id is not None and point.manifest_id != repo_id:
        raise ManifestError(
            f"calibrated on export {point.manifest_id[:12]}, but {args.write} is export {repo_id[:12]}: a threshold "
            "belongs to the scores of the model it was picked on"
        )
    return replace(point, manifest_id=repo_id).write(args.write)


def _report_lines(c: Calibration) -> list[str]:
    rates, b = c.calibrated, c.interval
    pct = f"{100 * b.confidence:g}%"
    lines = [
        f"threshold {c.threshold:.6g} ({c.method}"
        + (f", target FPR {c.target_fpr:g}" if c.target_fpr is not None else "")
        + f"); {pct} bootstrap interval [{b.threshold.low:.6g}, {b.threshold.high:.6g}] ({b.resamples} resamples)",
        f"on {rates.n_real} real, {rates.n_fake} generated: FPR {rates.fpr:.4f} [{b.fpr.low:.4f}, {b.fpr.high:.4f}], "
        f"TPR {rates.tpr:.4f} [{b.tpr.low:.4f}, {b.tpr.high:.4f}], accuracy {rates.accuracy:.4f}, "
        f"ROC AUC {c.curves.roc_auc:.4f}, AP {c.curves.average_precision:.4f}",
        "caught per generator: " + ", ".join(f"{g} {v:.3f}" for g, v in rates.caught_per_generator.items()),
    ]
    if c.held_out is not None:
        h = c.held_out
        lines.append(
            f"held out ({c.holdout:g}: {h.n_real} real, {h.n_fake} generated): FPR {h.fpr:.4f}, TPR {h.tpr:.4f}, "
            f"accuracy {h.accuracy:.4f}"
        )
    if c.failed:
        lines.append(f"{c.failed} image(s) could not be scored and are left out")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.manual is not None:
        if args.write is None:
            raise InputError("--manual stores a threshold in an export: name it with --write REPO")
        path = _write(args, OperatingPoint(args.manual, "manual"))
        print(f"wrote {path}: threshold {args.manual:g} (manual)")
        return 0
    if args.dataroot is None:
        raise InputError("--dataroot (a labelled folder) is needed, or --manual THRESHOLD --write REPO")
    require_metrics()
    dataset = discover(args.dataroot, args.generators)
    with open_scorer(args) as score:
        scored = score_dataset(score, dataset, progress=args.progress)
    scores, failed = LabelledScores.from_scored(scored)
    for s in failed:
        print(f"d3qe calibrate: {s.result.source}: {s.result.error}")
    manifest_id = _scored_by({s.result.manifest_id for items in scored.values() for s in items}, args)
    result = calibrate(
        scores,
        method=args.method,
        target_fpr=args.target_fpr,
        holdout=args.holdout,
        resamples=args.bootstrap,
        seed=args.bootstrap_seed,
        failed=len(failed),
        where=str(args.dataroot),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"dataroot": str(args.dataroot), "runtime": args.runtime, "manifest_id": manifest_id, **result.as_dict()}
    (args.out / "calibration.json").write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    plot_curves(result, args.out / "roc.png", args.out / "pr.png", f"D³QE on {args.dataroot.name} ({args.runtime})")
    print("\n".join(_report_lines(result)))
    print(f"wrote {args.out}/calibration.json, roc.png, pr.png")
    if args.write is not None:
        point = OperatingPoint(result.threshold, result.method, result.target_fpr, manifest_id, result.summary())
        print(f"wrote {_write(args, point)}: served verdicts use threshold {result.threshold:.6g} after a rollout")
    return 0
