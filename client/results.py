"""The types every runtime shares: the image it takes, the result it gives, and the scorer's signature.

These are the only definitions of `client` that other tiers import (serving's in-process scorers
produce `ScoreResult`s); this module imports nothing of ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DEFAULT_THRESHOLD = 0.5  # upstream decides "generated" when P > 0.5

# An image as every runtime takes it: its name in the results, and the encoded file (bytes), a path to read,
# or its decoded pixels (uint8 [H, W, 3]).
Item = tuple[str, bytes | Path | np.ndarray]


@dataclass(frozen=True)
class ScoreResult:
    """One image's score: its logit, P(generated) and the verdict at `threshold` (P > threshold: "generated"), or
    its error; and what produced it: `manifest_id`, the id of the export that scored it
    (`serving.manifest.Manifest.id`; None where the scorer does not say), and `threshold`."""

    source: str
    logit: float | None = None
    probability: float | None = None
    verdict: str | None = None  # "generated" or "real"; None when the image failed
    error: str | None = None
    manifest_id: str | None = None
    threshold: float | None = None  # the verdict's; None when the image failed

    @classmethod
    def from_logit(
        cls, source: str, logit: float, threshold: float = DEFAULT_THRESHOLD, manifest_id: str | None = None
    ) -> ScoreResult:
        p = 1.0 / (1.0 + math.exp(-logit)) if logit > -700 else 0.0
        return cls.from_scores(source, logit, p, threshold, manifest_id)

    @classmethod
    def from_scores(
        cls,
        source: str,
        logit: float,
        probability: float,
        threshold: float = DEFAULT_THRESHOLD,
        manifest_id: str | None = None,
    ) -> ScoreResult:
        """A model that outputs both (the served ensemble computes PROB in its graph)."""
        verdict = "generated" if probability > threshold else "real"
        return cls(source, float(logit), float(probability), verdict, None, manifest_id, float(threshold))

    @classmethod
    def failed(cls, source: str, error: str) -> ScoreResult:
        return cls(source, error=error)

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ScoreResult:
        """The result `as_dict` gave (a JSON line of `d3qe score --json`, a bulk row); fields it lacks are None."""
        return cls(**{f: data.get(f) for f in cls.__dataclass_fields__})


def provenance(ids: np.ndarray | None, thresholds: np.ndarray | None, n: int) -> tuple[list[str | None], list[float]]:
    """What produced a served answer of `n` items, from its MANIFEST_ID and THRESHOLD outputs (the contract's
    `PROVENANCE`): each item's manifest id and threshold; None and upstream's threshold where the server does not
    say (a server of before them, or a gate written without a manifest id)."""
    found = [v.decode() if isinstance(v, bytes) else str(v) for v in ids.reshape(-1)] if ids is not None else []
    served = [float(t) for t in thresholds.reshape(-1)] if thresholds is not None else []
    return (
        [i or None for i in found] if len(found) == n else [None] * n,
        served if len(served) == n else [DEFAULT_THRESHOLD] * n,
    )


# A runtime scores items: exactly one result per item, in input order, a failed item in its own slot.
Scorer = Callable[[Iterable[Item]], Iterator[ScoreResult]]
