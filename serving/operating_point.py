"""`operating_point.json` beside an export's manifest: the threshold its served verdicts use, and how it was chosen.

A threshold is an operating point, not part of the model: changing it changes no artifact and so not the
manifest's id. It travels with the export (`d3qe calibrate` writes it, the repository writer and a rollout
serve it); an export without the file serves upstream's 0.5 (`DEFAULT`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from d3qe_serve.client.results import DEFAULT_THRESHOLD
from d3qe_serve.errors import InputError, ManifestError

OPERATING_POINT = "operating_point.json"
METHODS = ("default", "target_fpr", "best_accuracy", "manual")


@dataclass(frozen=True)
class OperatingPoint:
    """Verdict "generated" when P(generated) > `threshold`; `method` and `details` say how it was picked."""

    threshold: float = DEFAULT_THRESHOLD
    method: str = "default"  # one of METHODS
    target_fpr: float | None = None  # method "target_fpr": the false-positive rate on real images aimed at
    manifest_id: str | None = None  # the export it was calibrated on (None: not calibrated)
    details: dict = field(default_factory=dict)  # calibration's record: counts, intervals, curves' files

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, int | float) or not 0.0 < float(self.threshold) < 1.0:
            raise InputError(f"threshold {self.threshold!r} is outside (0, 1): a probability threshold must be inside")
        if self.method not in METHODS:
            raise InputError(f"operating point method {self.method!r}: expected one of {METHODS}")
        if self.target_fpr is not None and not 0.0 <= self.target_fpr < 1.0:  # NaN fails it too
            raise InputError(f"target false-positive rate {self.target_fpr!r} is outside [0, 1)")

    def write(self, repo_dir: Path) -> Path:
        path = Path(repo_dir) / OPERATING_POINT
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, repo_dir: Path) -> OperatingPoint:
        """The export's operating point; upstream's default where it has none."""
        path = Path(repo_dir) / OPERATING_POINT
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise ManifestError(f"{path}: not an operating point ({e})") from e
