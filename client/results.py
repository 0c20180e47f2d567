"""The typed result of scoring one image, shared by every runtime and output format."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

DEFAULT_THRESHOLD = 0.5  # upstream decides "generated" at P >= 0.5


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
