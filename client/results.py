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
    source: str
    logit: float | None = None
    probability: float | None = None
    verdict: str | None = None  # "generated" or "real"; None when the image failed
    error: str | None = None

    @classmethod
    def from_logit(cls, source: str, logit: float, threshold: float = DEFAULT_THRESHOLD) -> ScoreResult:
        p = 1.0 / (1.0 + math.exp(-logit)) if logit > -700 else 0.0
        return cls.from_scores(source, logit, p, threshold)

    @classmethod
    def from_scores(
        cls, source: str, logit: float, probability: float, threshold: float = DEFAULT_THRESHOLD
    ) -> ScoreResult:
        """A model that outputs both (the served ensemble computes PROB in its graph)."""
        return cls(source, float(logit), float(probability), "generated" if probability > threshold else "real")

    @classmethod
    def failed(cls, source: str, error: str) -> ScoreResult:
        return cls(source, error=error)

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict:
        return asdict(self)


# A runtime scores items: exactly one result per item, in input order, a failed item in its own slot.
Scorer = Callable[[Iterable[Item]], Iterator[ScoreResult]]
