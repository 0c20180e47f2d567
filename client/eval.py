"""The paper's evaluation (accuracy, AP, real/fake accuracy per generator) through any runtime (`d3qe eval`).

Dataset layout, as upstream's test loader reads it: `DIR/<generator>/0_real|1_fake/*`, or
`DIR/<generator>/<class>/0_real|1_fake/*`, or a single `DIR/0_real|1_fake/*`. Metrics as upstream's
`validate`: P = sigmoid(logit), predicted fake when P > threshold (the one the verdicts used: the served or
exported operating point, `d3qe calibrate`; else upstream's 0.5), AP is scikit-learn's
`average_precision_score(y_true, P)`; the mean row averages over generators.

Robustness sweeps as upstream's `eval.py`, applied to the decoded RGB image before the standard transform:
JPEG re-compression with PIL at each `jpeg(quality)`; crops at each `crop(ratio)` resized back to the
original size with nearest-neighbour. Upstream crops at a seeded random offset (and, through OpenCV's
(width, height) order, swaps the sides of non-square images when resizing back); here the crop is
centred and the size kept, so runs are deterministic.
"""

from __future__ import annotations

import importlib.util
import io
import math
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from d3qe_serve.client.results import DEFAULT_THRESHOLD, Item, Scorer, ScoreResult
from d3qe_serve.errors import InputError, MissingDependencyError, NotFoundError

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


def discover(root: Path, generators: Sequence[str] | None = None) -> dict[str, list[Sample]]:
    """Generator name → labelled images, in upstream's test layout; `generators`: only these, in this order."""
    dataset = _discover(Path(root))
    if generators:
        missing = sorted(set(generators) - set(dataset))
        if missing:
            raise NotFoundError(f"no such generator folder(s) under {root}: {missing}")
        dataset = {g: dataset[g] for g in generators}
    return dataset


def _discover(root: Path) -> dict[str, list[Sample]]:
    if not root.is_dir():
        raise NotFoundError(f"dataset root is not a folder: {root}")
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
        raise NotFoundError(f"no 0_real/ or 1_fake/ folders under {root} or its subfolders")
    return dataset


@dataclass(frozen=True)
class Perturbation:
    """A robustness setting: decoded RGB image → re-encoded bytes that every runtime then scores."""

    name: str
    apply: Callable[[Path], bytes]


def _decoded(path: Path):
    """The image's RGB pixels as upstream reads them (PIL, `convert("RGB")`); InputError when it cannot be.

    The limits on size are the scorer's: it checks the perturbed image as it checks any other.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot decode {path.name}: {e}") from e


def jpeg(quality: int) -> Perturbation:
    def apply(path: Path) -> bytes:
        out = io.BytesIO()
        _decoded(path).save(out, format="JPEG", quality=quality)
        return out.getvalue()

    return Perturbation(f"jpeg{quality}", apply)


def crop(ratio: float) -> Perturbation:
    if not 0 < ratio <= 1:
        raise InputError(f"crop ratio must be in (0, 1], got {ratio}")

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


def require_metrics() -> None:
    """Raise `MissingDependencyError` unless scikit-learn, which computes the metrics, is installed."""
    if importlib.util.find_spec("sklearn") is None:
        raise MissingDependencyError("its metrics need scikit-learn: pip install 'd3qe-serve[eval]'")


def compute_metrics(generator: str, labels: np.ndarray, probs: np.ndarray, failed: int, threshold: float) -> Metrics:
    """Upstream's validate(): accuracy at P > threshold overall and per class, AP over P. NaN where undefined."""
    require_metrics()
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


@dataclass(frozen=True)
class Setting:
    """One setting's evaluation (clean, or a perturbation): each generator's metrics and every image's score."""

    name: str
    rows: list[Metrics]
    scored: dict[str, list[Scored]]  # generator → its images, in the dataset's order
    threshold: float = DEFAULT_THRESHOLD  # what the accuracies are measured at

    @property
    def failures(self) -> list[ScoreResult]:
        return [s.result for per_gen in self.scored.values() for s in per_gen if not s.result.ok]

    def as_dict(self) -> dict:
        """The metrics (with the mean row; NaN as null) and every image's result with its label."""
        return {
            "threshold": self.threshold,
            "metrics": [_json_metrics(r) for r in [*self.rows, mean_row(self.rows)]],
            "images": {g: [dict(s.result.as_dict(), label=s.label) for s in v] for g, v in self.scored.items()},
        }


def score_dataset(
    score: Scorer, dataset: dict[str, list[Sample]], perturbation: Perturbation | None = None, progress: bool = True
) -> dict[str, list[Scored]]:
    """Every image scored (perturbed first, if asked), with its label: generator → its images, in order."""
    scored = {}
    for gen, samples in dataset.items():
        desc = f"{perturbation.name if perturbation else 'clean'} {gen}"
        with tqdm(total=len(samples), desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
            results = _score_samples(score, samples, perturbation, bar)
        scored[gen] = [Scored(r, label) for r, (_, label) in zip(results, samples, strict=True)]
    return scored


def verdict_threshold(results: Iterable[ScoreResult], threshold: float | None = None) -> float:
    """The threshold the metrics use: `threshold` when given, else the one the results' verdicts used (the
    served or exported operating point: `ScoreResult.threshold`, where the scorer records it), else 0.5."""
    if threshold is not None:
        return threshold
    used = {t for r in results if r.ok and (t := getattr(r, "threshold", None)) is not None}
    if len(used) > 1:
        raise InputError(f"the results' verdicts used different thresholds {sorted(used)}: pass --threshold")
    return used.pop() if used else DEFAULT_THRESHOLD


def evaluate(
    score: Scorer,
    dataset: dict[str, list[Sample]],
    perturbation: Perturbation | None = None,
    threshold: float | None = None,
    progress: bool = True,
) -> Setting:
    """Score every image (perturbed first, if asked) and compute each generator's metrics at `threshold`
    (default: `verdict_threshold` of the results)."""
    require_metrics()
    scored = score_dataset(score, dataset, perturbation, progress)
    threshold = verdict_threshold((s.result for pairs in scored.values() for s in pairs), threshold)
    rows = []
    for gen, pairs in scored.items():
        ok = [s for s in pairs if s.result.ok]
        labels = np.array([s.label for s in ok], dtype=np.int64)
        probs = np.array([s.result.probability for s in ok], dtype=np.float64)
        rows.append(compute_metrics(gen, labels, probs, len(pairs) - len(ok), threshold))
    return Setting(perturbation.name if perturbation else "clean", rows, scored, threshold)


def _score_samples(
    score: Scorer, samples: list[Sample], perturbation: Perturbation | None, bar: tqdm
) -> list[ScoreResult]:
    """Every sample's result, in the samples' order; one that cannot be perturbed (an undecodable file) fails
    alone, in its slot, and is not sent."""
    results: list[ScoreResult | None] = [None] * len(samples)
    sent: deque[int] = deque()  # the slots of the items given to the scorer, whose results come in this order

    def items() -> Iterator[Item]:
        for i, (path, _) in enumerate(samples):
            try:
                data = path if perturbation is None else perturbation.apply(path)
            except InputError as e:  # an undecodable file
                results[i] = ScoreResult.failed(str(path), f"{perturbation.name}: {e}")
                bar.update()
                continue
            sent.append(i)
            yield str(path), data

    for r in score(items()):
        results[sent.popleft()] = r
        bar.update()
    return results


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


def _json_metrics(m: Metrics) -> dict:
    """NaN (a metric undefined for this data) as null: strict JSON has no NaN."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(m).items()}
