"""Operating points: the threshold on P(generated) chosen on a labelled set (`d3qe calibrate`).

Every threshold of the project is picked here, from labelled scores (`LabelledScores`, what `client.eval`'s
scoring of upstream's `0_real`/`1_fake` layout gives):

- `target_fpr`: the lowest threshold whose false-positive rate on the real images is at most the target
  (verdict "generated" when P > threshold, as everywhere: `client.results.ScoreResult`);
- `best_accuracy`: the threshold (a midpoint between two scores) with the highest accuracy on the set.

`calibrate` adds a seeded bootstrap (real and generated images resampled apart, the threshold picked again
on each resample): percentile intervals of the threshold and of its false-positive and true-positive rates,
the rate of each generator caught at the threshold, and the ROC and precision-recall curves (scikit-learn's
`roc_curve`, `precision_recall_curve`). With a held-out split (`holdout`, stratified by generator and class)
the threshold is picked on the rest and its realised rates on the held-out images are reported against the
target. Writing it into an export (`serving.operating_point.OperatingPoint`) is the command's part.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from d3qe_serve.client.eval import Scored, require_metrics
from d3qe_serve.errors import InputError, MissingDependencyError

METHODS = ("target_fpr", "best_accuracy")
CONFIDENCE = 0.95
# A threshold stays strictly inside (0, 1), as `OperatingPoint` requires: scores of exactly 0 or 1 (saturated
# float32 probabilities) are thresholded at the nearest representable value inside.
_LOW, _HIGH = np.nextafter(0.0, 1.0), np.nextafter(1.0, 0.0)


@dataclass(frozen=True)
class LabelledScores:
    """Scored images with their labels (0 real, 1 generated), probabilities and generator (the dataset's folder)."""

    labels: np.ndarray
    probs: np.ndarray
    generators: np.ndarray
    sources: tuple[str, ...] = ()

    @classmethod
    def from_scored(cls, scored: dict[str, list[Scored]]) -> tuple[LabelledScores, list[Scored]]:
        """The images that were scored (and the failed ones, apart), in the dataset's order."""
        ok = [(g, s) for g, items in scored.items() for s in items if s.result.ok]
        failed = [s for items in scored.values() for s in items if not s.result.ok]
        return (
            cls(
                np.array([s.label for _, s in ok], dtype=np.int64),
                np.array([s.result.probability for _, s in ok], dtype=np.float64),
                np.array([g for g, _ in ok], dtype=object),
                tuple(s.result.source for _, s in ok),
            ),
            failed,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: np.ndarray) -> LabelledScores:
        sources = tuple(np.array(self.sources, dtype=object)[mask]) if self.sources else ()
        return LabelledScores(self.labels[mask], self.probs[mask], self.generators[mask], sources)

    def require_both_classes(self, where: str) -> None:
        """`InputError` unless there are real and generated images (a threshold needs both)."""
        n_real, n_fake = int((self.labels == 0).sum()), int((self.labels == 1).sum())
        if not n_real or not n_fake:
            missing = "real images (0_real/)" if not n_real else "generated images (1_fake/)"
            raise InputError(
                f"{where} has no scored {missing}: calibration needs both classes ({n_real} real, {n_fake} generated)"
            )

    def split(self, holdout: float, seed: int) -> tuple[LabelledScores, LabelledScores]:
        """(calibration, held-out): `holdout` of each generator's real and generated images held out, seeded."""
        if not 0 < holdout < 1:
            raise InputError(f"holdout must be a fraction in (0, 1), got {holdout}")
        rng = np.random.default_rng(seed)
        held = np.zeros(len(self), dtype=bool)
        for g in np.unique(self.generators):
            for label in (0, 1):
                idx = np.flatnonzero((self.generators == g) & (self.labels == label))
                held[rng.permutation(idx)[: round(holdout * len(idx))]] = True
        return self.subset(~held), self.subset(held)


def threshold_at_fpr(real_probs: np.ndarray, target_fpr: float) -> float:
    """The lowest threshold t with mean(real_probs > t) <= target_fpr: the (k+1)-th highest real score, k =
    floor(target·n) (a tie at it may leave fewer than k above). Inside (0, 1)."""
    if not 0 <= target_fpr < 1:
        raise InputError(f"target false-positive rate {target_fpr!r} is outside [0, 1)")
    if real_probs.size == 0:
        raise InputError("no real images: a false-positive rate needs some")
    ranked = np.sort(real_probs)[::-1]
    k = math.floor(target_fpr * ranked.size + 1e-9)  # 1e-9: 0.05 · 200 is 10, not 9.999…
    return float(np.clip(ranked[min(k, ranked.size - 1)], _LOW, _HIGH))


def threshold_best_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold of highest accuracy: a midpoint between consecutive distinct scores (or just below the
    lowest / at the highest); the lowest of equally good ones. Inside (0, 1)."""
    values = np.unique(probs)
    candidates = np.concatenate([[np.nextafter(values[0], 0.0)], (values[:-1] + values[1:]) / 2, [values[-1]]])
    order = np.argsort(probs)
    sorted_probs, sorted_labels = probs[order], labels[order]
    # images at or below each candidate are called real: correct ones are the reals there plus the fakes above
    below = np.searchsorted(sorted_probs, candidates, side="right")
    reals_below = np.concatenate([[0], np.cumsum(sorted_labels == 0)])[below]
    fakes_above = int((labels == 1).sum()) - np.concatenate([[0], np.cumsum(sorted_labels == 1)])[below]
    best = candidates[int(np.argmax(reals_below + fakes_above))]
    return float(np.clip(best, _LOW, _HIGH))


def pick_threshold(scores: LabelledScores, method: str, target_fpr: float | None = None) -> float:
    """The threshold `method` picks on `scores` (see the module docstring)."""
    if method == "target_fpr":
        if target_fpr is None:
            raise InputError("method target_fpr needs a target false-positive rate")
        return threshold_at_fpr(scores.probs[scores.labels == 0], target_fpr)
    if method == "best_accuracy":
        return threshold_best_accuracy(scores.labels, scores.probs)
    raise InputError(f"calibration method {method!r}: expected one of {METHODS}")


@dataclass(frozen=True)
class Rates:
    """What a threshold does on a labelled set: false-positive rate (reals called generated), true-positive
    rate (generated ones caught), accuracy, counts, and the rate caught per generator."""

    n_real: int
    n_fake: int
    fpr: float
    tpr: float
    accuracy: float
    caught_per_generator: dict[str, float] = field(default_factory=dict)
    fpr_per_generator: dict[str, float] = field(default_factory=dict)

    @classmethod
    def at(cls, scores: LabelledScores, threshold: float) -> Rates:
        called = scores.probs > threshold
        real, fake = scores.labels == 0, scores.labels == 1

        def rate(mask: np.ndarray) -> float:
            return float(called[mask].mean()) if mask.any() else math.nan

        gens = [str(g) for g in dict.fromkeys(scores.generators)]
        return cls(
            int(real.sum()),
            int(fake.sum()),
            rate(real),
            rate(fake),
            float((called == fake).mean()) if len(scores) else math.nan,
            {g: rate(fake & (scores.generators == g)) for g in gens if (fake & (scores.generators == g)).any()},
            {g: rate(real & (scores.generators == g)) for g in gens if (real & (scores.generators == g)).any()},
        )


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class Bootstrap:
    """Percentile intervals (`confidence`) over `resamples` seeded resamples: of the threshold the method picks
    on each, and of the false- and true-positive rates of the chosen threshold on each."""

    resamples: int
    seed: int
    confidence: float
    threshold: Interval
    fpr: Interval
    tpr: Interval


def bootstrap(
    scores: LabelledScores,
    threshold: float,
    method: str,
    target_fpr: float | None,
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Bootstrap:
    """Resample the real and the generated images apart (with replacement, `seed`): see `Bootstrap`."""
    rng = np.random.default_rng(seed)
    real, fake = scores.probs[scores.labels == 0], scores.probs[scores.labels == 1]
    thresholds, fprs, tprs = [], [], []
    for _ in range(resamples):
        r, f = rng.choice(real, real.size), rng.choice(fake, fake.size)
        resample = LabelledScores(
            np.concatenate([np.zeros(r.size, np.int64), np.ones(f.size, np.int64)]),
            np.concatenate([r, f]),
            np.zeros(r.size + f.size, dtype=object),
        )
        thresholds.append(pick_threshold(resample, method, target_fpr))
        fprs.append(float((r > threshold).mean()))
        tprs.append(float((f > threshold).mean()))
    tail = (1 - confidence) / 2 * 100

    def interval(values: list[float]) -> Interval:
        low, high = np.percentile(values, [tail, 100 - tail])
        return Interval(float(low), float(high))

    return Bootstrap(resamples, seed, confidence, interval(thresholds), interval(fprs), interval(tprs))


@dataclass(frozen=True)
class Curves:
    """scikit-learn's ROC (`roc_curve`) and precision-recall (`precision_recall_curve`) curves, their areas."""

    fpr: list[float]
    tpr: list[float]
    roc_thresholds: list[float]
    precision: list[float]
    recall: list[float]
    pr_thresholds: list[float]
    roc_auc: float
    average_precision: float

    @classmethod
    def of(cls, scores: LabelledScores) -> Curves:
        require_metrics()
        from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

        fpr, tpr, roc_t = roc_curve(scores.labels, scores.probs)
        precision, recall, pr_t = precision_recall_curve(scores.labels, scores.probs)
        roc_t = np.where(np.isinf(roc_t), 1.0, roc_t)  # sklearn's first threshold is +inf: no image called generated
        return cls(
            fpr.tolist(),
            tpr.tolist(),
            roc_t.tolist(),
            precision.tolist(),
            recall.tolist(),
            pr_t.tolist(),
            float(roc_auc_score(scores.labels, scores.probs)),
            float(average_precision_score(scores.labels, scores.probs)),
        )


@dataclass(frozen=True)
class Calibration:
    """An operating point picked on `calibrated_on` images: the threshold, how it was picked, its rates and
    bootstrap intervals on them, and (with a held-out split) its rates on the held-out images."""

    threshold: float
    method: str
    target_fpr: float | None
    calibrated: Rates
    interval: Bootstrap
    curves: Curves
    held_out: Rates | None = None
    holdout: float | None = None
    failed: int = 0

    def summary(self) -> dict:
        """The record without the curves (what an `OperatingPoint`'s details keep)."""
        record = asdict(self)
        del record["curves"]
        record["roc_auc"], record["average_precision"] = self.curves.roc_auc, self.curves.average_precision
        return _finite(record)

    def as_dict(self) -> dict:
        return {**self.summary(), "curves": asdict(self.curves)}


def _finite(value):
    """NaN (a rate of an empty class) as None: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def calibrate(
    scores: LabelledScores,
    *,
    method: str = "target_fpr",
    target_fpr: float | None = 0.05,
    holdout: float | None = None,
    resamples: int = 1000,
    seed: int = 0,
    failed: int = 0,
    where: str = "the calibration set",
) -> Calibration:
    """Pick the threshold on `scores` (minus a seeded `holdout` fraction, whose rates are then reported)."""
    if method not in METHODS:
        raise InputError(f"calibration method {method!r}: expected one of {METHODS}")
    if method == "best_accuracy":
        target_fpr = None
    scores.require_both_classes(where)
    held = None
    if holdout:
        scores, held = scores.split(holdout, seed)
        scores.require_both_classes(f"{where} without its held-out {holdout:g}")
    threshold = pick_threshold(scores, method, target_fpr)
    return Calibration(
        threshold,
        method,
        target_fpr,
        Rates.at(scores, threshold),
        bootstrap(scores, threshold, method, target_fpr, resamples=resamples, seed=seed),
        Curves.of(scores),
        None if held is None else Rates.at(held, threshold),
        holdout,
        failed,
    )


def plot_curves(calibration: Calibration, roc_path, pr_path, title: str) -> None:
    """The ROC curve with the chosen point (and its bootstrap FPR interval), and the precision-recall curve."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError("the curves' plots need matplotlib: pip install 'd3qe-serve[export]'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, rates = calibration.curves, calibration.calibrated
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(c.fpr, c.tpr, label=f"ROC (AUC {c.roc_auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls=":")
    ax.errorbar(
        [rates.fpr],
        [rates.tpr],
        xerr=[[rates.fpr - calibration.interval.fpr.low], [calibration.interval.fpr.high - rates.fpr]],
        fmt="o",
        color="red",
        label=f"threshold {calibration.threshold:.4g} ({calibration.method})",
    )
    if calibration.held_out is not None:
        ax.plot([calibration.held_out.fpr], [calibration.held_out.tpr], "x", color="black", label="held out")
    if calibration.target_fpr is not None:
        ax.axvline(calibration.target_fpr, color="red", lw=0.5, ls="--", label=f"target FPR {calibration.target_fpr}")
    ax.set(xlabel="false-positive rate (real called generated)", ylabel="true-positive rate", xlim=(0, 1), ylim=(0, 1))
    _save(fig, ax, roc_path, title, "lower right")

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(c.recall, c.precision, label=f"precision-recall (AP {c.average_precision:.3f})")
    precision_at = (rates.tpr * rates.n_fake) / max(rates.tpr * rates.n_fake + rates.fpr * rates.n_real, 1e-12)
    ax.plot([rates.tpr], [precision_at], "o", color="red", label=f"threshold {calibration.threshold:.4g}")
    ax.set(xlabel="recall (generated caught)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    _save(fig, ax, pr_path, title, "lower left")


def _save(fig, ax, path, title: str, legend: str) -> None:
    import matplotlib.pyplot as plt

    ax.legend(loc=legend, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
