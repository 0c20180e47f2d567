"""Benchmarks: speed and fidelity of every runtime against the eager model measured in the same run.

Each writes its results as JSON and a plot under `RESULTS/<machine>-<date>/` (`results_dir`), with the
machine and tool versions (`serving.host`) recorded beside the numbers.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from d3qe_serve.serving.host import machine_slug, tool_versions

RESULTS = Path(__file__).resolve().parent / "results"


def results_dir(info: dict, out: Path | None = None) -> Path:
    """`out`, else `RESULTS/<machine slug>-<today>` for the machine `info` describes (`serving.host.machine`)."""
    return out or RESULTS / f"{machine_slug(info)}-{datetime.date.today().isoformat()}"


def report_header(what: str, info: dict) -> dict:
    """The fields every results file starts with: a title naming what, where and when; the date, the machine
    (`serving.host.machine`) and the tool versions."""
    date = datetime.date.today().isoformat()
    where = info.get("gpu") or f"{info['cpu']} ({info['cores']} cores)"
    return {"title": f"{what}: {where}, {date}", "date": date, "machine": info, "versions": tool_versions(commit=True)}


def save_figure(fig, path: Path, title: str, *, fontsize: float = 10, dpi: int = 110) -> None:
    """A benchmark's matplotlib figure titled, laid out, written to `path` and closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
