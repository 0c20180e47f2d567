"""`d3qe tune`'s figure: each candidate's speed against its error, one panel per part (`export.tune`'s record).

x: |Δlogit| p99 against eager fp32 with the candidate swapped into the fp32 chain (one unit for every part);
y: images/s of the part alone at each batch size timed. Filled markers hold the bounds, hollow ones do not,
the chosen candidate is ringed; candidates that failed to build, load or run are listed under their panel.
"""

from __future__ import annotations

from pathlib import Path

from d3qe_serve.benchmarks import save_figure

FLOOR = 1e-9  # log axis: a candidate equal to eager is drawn at the floor
MARKERS = "os^Dv<>p"  # one per batch size


def plot_tuning(record: dict, path: Path, title: str) -> Path:
    """Write the figure of `record` (`Manifest.tuning`) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = record["parts"]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 5.5), squeeze=False)
    for ax, (part, tuned) in zip(axes[0], parts.items(), strict=True):
        measured = [r for r in tuned["candidates"] if r["status"] == "measured"]
        colours = plt.get_cmap("tab10")
        for i, row in enumerate(measured):
            x = max(row["fidelity"]["end_to_end"]["dlogit"]["p99"] or FLOOR, FLOOR)
            for j, speed in enumerate(row["speed"]["batches"].values()):
                ax.scatter(
                    x,
                    speed["images_per_s"],
                    marker=MARKERS[j % len(MARKERS)],
                    s=60,
                    facecolors=colours(i % 10) if row["holds"] else "none",
                    edgecolors=colours(i % 10),
                    label=f"{row['runtime']} {row['precision']}" if j == 0 else None,
                )
                if row["chosen"]:
                    ax.scatter(x, speed["images_per_s"], marker="o", s=260, facecolors="none", edgecolors="black")
        ax.set_xscale("log")
        ax.set_xlabel("|Δlogit| p99 vs eager fp32 (candidate in the fp32 chain)")
        ax.set_ylabel(
            "images/s, part alone ("
            + ", ".join(f"{MARKERS[j % len(MARKERS)]}: batch {b}" for j, b in enumerate(record["batches"]))
            + ")"
        )
        choice = tuned["choice"]
        ax.set_title(f"{part} → {choice['runtime']} {choice['precision']}", fontsize=10)
        ax.legend(fontsize=7, loc="best")
        failed = [
            f"{r['runtime']} {r['precision']}: {r['stage']} failed"
            for r in tuned["candidates"]
            if r["status"] == "failed"
        ]
        if failed:
            ax.text(0.01, -0.2, "\n".join(failed), transform=ax.transAxes, fontsize=7, va="top")
    save_figure(fig, path, f"{title} (filled: within `{record['bounds']['name']}`; ringed: chosen)")
    return path
