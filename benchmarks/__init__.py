"""Benchmarks: speed and fidelity of every runtime against the eager model measured in the same run.

Each writes its results as JSON and a plot under `RESULTS/<machine>-<date>/` (`results_dir`), relative to the
folder it runs in, with the machine and tool versions (`serving.host`) recorded beside the numbers. The eager
reference is the model the measured export was exported from (`exported_weights`).
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from pathlib import Path

from d3qe_serve.errors import InputError
from d3qe_serve.serving.host import machine_slug, tool_versions
from d3qe_serve.serving.inprocess import WeightOptions
from d3qe_serve.serving.manifest import Manifest

# Results are not package data: relative to the working directory (in a checkout, the repository's own
# benchmarks/results/, where the committed measurements are).
RESULTS = Path("benchmarks") / "results"


@dataclass(frozen=True)
class Results:
    """What a benchmark wrote: its report (the JSON's content) and its files, the JSON first."""

    report: dict
    files: tuple[Path, ...]

    @classmethod
    def written(cls, report: dict, folder: Path, *names: str) -> Results:
        """The files `names` in `folder`."""
        return cls(report, tuple(folder / name for name in names))

    @property
    def folder(self) -> Path:
        return self.files[0].parent


def results_dir(info: dict, out: Path | None = None) -> Path:
    """`out`, else `RESULTS/<machine slug>-<today>` for the machine `info` describes (`serving.host.machine`)."""
    return out or RESULTS / f"{machine_slug(info)}-{datetime.date.today().isoformat()}"


def report_header(what: str, info: dict) -> dict:
    """The fields every results file starts with: a title naming what, where and when; the date, the machine
    (`serving.host.machine`) and the tool versions."""
    date = datetime.date.today().isoformat()
    where = info.get("gpu") or f"{info['cpu']} ({info['cores']} cores)"
    return {"title": f"{what}: {where}, {date}", "date": date, "machine": info, "versions": tool_versions(commit=True)}


def exported_weights(weights: WeightOptions, repo: Path | None) -> WeightOptions:
    """The eager model `repo` was exported from: `weights`' checkpoint with the manifest's freq_bias, else the
    manifest's seeded weights. Without `repo`, `weights` as they are."""
    if repo is None:
        return weights
    manifest = Manifest.read(repo)
    weights = dataclasses.replace(weights, freq_bias=manifest.freq_bias)
    if weights.checkpoint is not None:
        return weights
    if manifest.checkpoint:
        raise InputError(f"{repo} was exported from {manifest.checkpoint['file']}: pass --checkpoint")
    return dataclasses.replace(weights, **(manifest.seeded_weights or {}))


def weights_record(weights: WeightOptions) -> dict:
    """The eager reference as a report records it: checkpoint, preset, seed, freq_bias and a description."""
    checkpoint = None if weights.checkpoint is None else str(weights.checkpoint)
    record = {"checkpoint": checkpoint, "preset": weights.preset, "seed": weights.seed, "freq_bias": weights.freq_bias}
    if checkpoint:
        record["description"] = f"checkpoint {checkpoint}, freq_bias {weights.freq_bias}"
    else:
        record["description"] = (
            f"preset {weights.preset}, seeded random weights (seed {weights.seed}), freq_bias {weights.freq_bias}"
        )
    return record


def save_figure(fig, path: Path, title: str, *, fontsize: float = 10, dpi: int = 110) -> None:
    """A benchmark's matplotlib figure titled, laid out, written to `path` and closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
