"""`d3qe eval`: the paper's evaluation (accuracy, AP, real/fake accuracy per generator) through any runtime.

Dataset layout, as upstream's test loader reads it: `DIR/<generator>/0_real|1_fake/*`, or
`DIR/<generator>/<class>/0_real|1_fake/*`, or a single `DIR/0_real|1_fake/*`. Metrics as upstream's
`validate`: P = sigmoid(logit), predicted fake when P > threshold (0.5), AP is scikit-learn's
`average_precision_score(y_true, P)`; the mean row averages over generators.

Robustness sweeps as upstream's `eval.py`, applied to the decoded RGB image before the standard transform:
JPEG re-compression with PIL at each `--jpeg-quality`; crops at each `--crop-ratio` resized back to the
original size with nearest-neighbour. Upstream crops at a seeded random offset (and, through OpenCV's
(width, height) order, swaps the sides of non-square images when resizing back); here the crop is
centred and the size kept, so runs are deterministic.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from d3qe_serve.client.grpc_client import ModelMismatchError, ServerNotReadyError
from d3qe_serve.client.results import InProcessRuntime, Item, Scorer, ScoreResult
from d3qe_serve.client.score import add_runtime_arguments, open_runtime

CLASSES = {"0_real": 0, "1_fake": 1}

Sample = tuple[Path, int]  # image file, label (0 real, 1 generated)


def _class_folders(folder: Path) -> bool:
    return any((folder / c).is_dir() for c in CLASSES)


def _samples(folder: Path) -> list[Sample]:
    """Every non-hidden file under 0_real/ and 1_fake/ (nothing is filtered out: a bad file is reported)."""
    return [
        (f, label)
        for cls, label in CLASSES.items()
        if (folder / cls).is_dir()
        for f in sorted((folder / cls).iterdir())
        if f.is_file() and not f.name.startswith(".")
    ]


def discover(root: Path) -> dict[str, list[Sample]]:
    """Generator name → labelled images, in upstream's test layout."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root is not a folder: {root}")
    if _class_folders(root):
        return {root.name: _samples(root)}
    dataset: dict[str, list[Sample]] = {}
    for gen in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        if _class_folders(gen):
            dataset[gen.name] = _samples(gen)
        else:  # a level of object classes between the generator and 0_real/1_fake
            nested = [s for c in sorted(gen.iterdir()) if c.is_dir() and _class_folders(c) for s in _samples(c)]
            if nested:
                dataset[gen.name] = nested
    if not dataset:
        raise FileNotFoundError(f"no 0_real/ or 1_fake/ folders under {root} or its subfolders")
    return dataset


@dataclass(frozen=True)
class Perturbation:
    """A robustness setting: decoded RGB image → re-encoded bytes that every runtime then scores."""

    name: str
    apply: Callable[[Path], bytes]


def _decoded(path: Path):
    """The image's RGB pixels as upstream reads them (PIL, `convert("RGB")`); ValueError when it cannot be.

    The limits on size are the scorer's: it checks the perturbed image as it checks any other.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode {path.name}: {e}") from e


def jpeg(quality: int) -> Perturbation:
    def apply(path: Path) -> bytes:
        out = io.BytesIO()
        _decoded(path).save(out, format="JPEG", quality=quality)
        return out.getvalue()

    return Perturbation(f"jpeg{quality}", apply)


def crop(ratio: float) -> Perturbation:
    if not 0 < ratio <= 1:
        raise ValueError(f"crop ratio must be in (0, 1], got {ratio}")

    def apply(path: Path) -> bytes:
        from PIL import Image

        img = _decoded(path)
        w, h = img.size
        tw, th = int(w * ratio), int(h * ratio)
        left, top = (w - tw) // 2, (h - th) // 2
        out = io.BytesIO()
        # PNG: lossless, so the crop is the only change
        img.crop((left, top, left + tw, top + th)).resize((w, h), Image.NEAREST).save(out, format="PNG")
        return out.getvalue()

    return Perturbation(f"crop{ratio:g}", apply)


@dataclass(frozen=True)
class Metrics:
    generator: str
    n_real: int
    n_fake: int
    failed: int
    acc: float
    ap: float
    r_acc: float
    f_acc: float


def compute_metrics(generator: str, labels: np.ndarray, probs: np.ndarray, failed: int, threshold: float) -> Metrics:
    """Upstream's validate(): accuracy at P > threshold overall and per class, AP over P. NaN where undefined."""
    from sklearn.metrics import accuracy_score, average_precision_score  # seconds to import: only when used

    pred = probs > threshold
    real, fake = labels == 0, labels == 1
    acc = accuracy_score(labels, pred) if labels.size else math.nan
    r_acc = accuracy_score(labels[real], pred[real]) if real.any() else math.nan
    f_acc = accuracy_score(labels[fake], pred[fake]) if fake.any() else math.nan
    ap = average_precision_score(labels, probs) if real.any() and fake.any() else math.nan
    return Metrics(generator, int(real.sum()), int(fake.sum()), failed, acc, ap, r_acc, f_acc)


def mean_row(rows: list[Metrics]) -> Metrics:
    def mean(field: str) -> float:
        return float(np.mean([getattr(r, field) for r in rows]))

    return Metrics(
        "mean",
        sum(r.n_real for r in rows),
        sum(r.n_fake for r in rows),
        sum(r.failed for r in rows),
        mean("acc"),
        mean("ap"),
        mean("r_acc"),
        mean("f_acc"),
    )


@dataclass(frozen=True)
class Scored:
    result: ScoreResult
    label: int


def evaluate(
    score: Scorer,
    dataset: dict[str, list[Sample]],
    perturbation: Perturbation | None = None,
    threshold: float = 0.5,
    progress: bool = True,
) -> tuple[list[Metrics], dict[str, list[Scored]]]:
    """Score every image (perturbed first, if asked) and compute each generator's metrics."""
    rows, scored = [], {}
    for gen, samples in dataset.items():
        label_of = {str(path): label for path, label in samples}
        desc = f"{perturbation.name if perturbation else 'clean'} {gen}"
        with tqdm(total=len(samples), desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
            results = _score_samples(score, samples, perturbation, bar)
        ok = [r for r in results if r.ok]
        labels = np.array([label_of[r.source] for r in ok], dtype=np.int64)
        probs = np.array([r.probability for r in ok], dtype=np.float64)
        rows.append(compute_metrics(gen, labels, probs, len(results) - len(ok), threshold))
        scored[gen] = [Scored(r, label_of[r.source]) for r in results]
    return rows, scored


def _score_samples(
    score: Scorer, samples: list[Sample], perturbation: Perturbation | None, bar: tqdm
) -> list[ScoreResult]:
    """Every sample's result; one that cannot be perturbed (an undecodable file) fails alone."""
    results: list[ScoreResult] = []

    def items() -> Iterator[Item]:
        for path, _ in samples:
            if perturbation is None:
                yield str(path), path
                continue
            try:
                yield str(path), perturbation.apply(path)
            except ValueError as e:  # an undecodable file
                results.append(ScoreResult.failed(str(path), f"{perturbation.name}: {e}"))
                bar.update()

    for r in score(items()):
        results.append(r)
        bar.update()
    order = {str(path): i for i, (path, _) in enumerate(samples)}
    return sorted(results, key=lambda r: order[r.source])  # perturbation failures were added out of turn


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.2f}"


def format_table(title: str, rows: list[Metrics]) -> str:
    """Upstream's per-generator rows (in %) plus the mean, as a markdown table."""
    lines = [f"### {title}", "", "| generator | real | fake | failed | Acc | AP | r_acc | f_acc |", "|---" * 8 + "|"]
    for r in [*rows, mean_row(rows)]:
        lines.append(
            f"| {r.generator} | {r.n_real} | {r.n_fake} | {r.failed} | {_pct(r.acc)} | {_pct(r.ap)} "
            f"| {_pct(r.r_acc)} | {_pct(r.f_acc)} |"
        )
    return "\n".join(lines)


def format_summary(settings: dict[str, list[Metrics]]) -> str:
    """The paper's layout: one row per setting, Acc/AP per generator, then the mean."""
    gens = [r.generator for r in next(iter(settings.values()))]
    lines = ["| setting | " + " | ".join([*gens, "Mean"]) + " |", "|---" * (len(gens) + 2) + "|"]
    for name, rows in settings.items():
        cells = [f"{_pct(r.acc)} / {_pct(r.ap)}" for r in [*rows, mean_row(rows)]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(["Acc / AP (%)", "", *lines])


def add_arguments(p: argparse.ArgumentParser, in_process: Sequence[InProcessRuntime] = ()) -> None:
    p.add_argument(
        "--dataroot", type=Path, required=True, help="DIR/<generator>/0_real|1_fake/* or DIR/0_real|1_fake/*"
    )
    p.add_argument("--generators", nargs="+", help="only these subfolders of DIR (default: all)")
    add_runtime_arguments(p, in_process)
    p.add_argument("--jpeg-quality", type=int, nargs="+", default=[], help="robustness: JPEG qualities, e.g. 95 75 50")
    p.add_argument("--crop-ratio", type=float, nargs="+", default=[], help="robustness: crop ratios, e.g. 0.9 0.5")
    p.add_argument("--out", type=Path, help="write metrics and every image's score to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace, in_process: Sequence[InProcessRuntime] = ()) -> int:
    if importlib.util.find_spec("sklearn") is None:
        print("d3qe eval: its metrics need scikit-learn: pip install 'd3qe-serve[eval]'", file=sys.stderr)
        return 2
    try:
        dataset = discover(args.dataroot)
        perturbations = [None, *map(jpeg, args.jpeg_quality), *map(crop, args.crop_ratio)]
    except (FileNotFoundError, ValueError) as e:
        print(f"d3qe eval: {e}", file=sys.stderr)
        return 2
    if args.generators:
        missing = sorted(set(args.generators) - set(dataset))
        if missing:
            print(f"d3qe eval: no such generator folder(s) under {args.dataroot}: {missing}", file=sys.stderr)
            return 2
        dataset = {g: dataset[g] for g in args.generators}
    runtime = args.url if args.runtime == "server" else args.runtime
    settings: dict[str, list[Metrics]] = {}
    report = {"dataroot": str(args.dataroot), "runtime": args.runtime, "url": args.url, "settings": {}}
    failed = 0
    try:
        with open_runtime(args, in_process) as score:
            for perturbation in perturbations:
                name = perturbation.name if perturbation else "clean"
                rows, scored = evaluate(score, dataset, perturbation, args.threshold, args.progress)
                settings[name] = rows
                print(format_table(f"D³QE on {args.dataroot} ({runtime}, {name})", rows) + "\n", flush=True)
                for s in (s for per_gen in scored.values() for s in per_gen if not s.result.ok):
                    print(f"d3qe eval: {name}: {s.result.source}: {s.result.error}", file=sys.stderr)
                failed += sum(r.failed for r in rows)
                report["settings"][name] = {
                    "metrics": [_json_metrics(r) for r in [*rows, mean_row(rows)]],
                    "images": {g: [dict(s.result.as_dict(), label=s.label) for s in v] for g, v in scored.items()},
                }
    except (ServerNotReadyError, ModelMismatchError) as e:
        print(f"d3qe eval: {e}", file=sys.stderr)
        return 2
    print(format_summary(settings))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, allow_nan=False))
    return 1 if failed else 0


def _json_metrics(m: Metrics) -> dict:
    """NaN (a metric undefined for this data) as null: strict JSON has no NaN."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(m).items()}
