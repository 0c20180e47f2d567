"""Per-part speed of exported artifacts against the eager part, measured in the same run.

    d3qe bench-parts --repo build/model_repository build/model_repository_int8 [--batches 1 8]

Each repository (written by `d3qe export`) is run part by part in-process through
`serving.runtimes.load_part`; the eager fp32 part of the model they were exported from is timed in
the same loop, interleaved with them, so load from other processes hits both alike. Prints ms/image
and the ratio to eager per part and batch, with each export's size, export time and measured
error from its manifest; writes `export_parts.json` and `export_parts.png` under
`benchmarks/results/<machine>-<date>/` (under the working directory).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from d3qe_serve.benchmarks import Results, exported_weights, results_dir, save_figure
from d3qe_serve.d3qe.parts import PART_NAMES, eager_tensors, part_specs
from d3qe_serve.export.validate import synthetic_pixels
from d3qe_serve.serving.host import machine, tool_versions
from d3qe_serve.serving.inprocess import WeightOptions
from d3qe_serve.serving.manifest import Manifest
from d3qe_serve.serving.runtimes import load_part


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _export_summary(manifest: Manifest) -> dict:
    parts = {}
    for part, entry in manifest.parts.items():
        parts[part] = {
            "bytes": entry.bytes,
            "export_seconds": entry.export_seconds,
            "worst": entry.validation["worst"],
        }
    return {
        "runtime": manifest.runtime,
        "precision": manifest.precision,
        "parts": parts,
        "end_to_end": manifest.end_to_end["measured"],
    }


def _plot(rows: list[dict], batches: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            ms = [
                next(
                    r["ms_per_image"]
                    for r in rows
                    if r["part"] == p and r["variant"] == variant and r["batch"] == batch
                )
                for p in PART_NAMES
            ]
            ax.bar(np.arange(len(PART_NAMES)) + i * width, ms, width, label=variant)
        ax.set_xticks(np.arange(len(PART_NAMES)) + width * (len(variants) - 1) / 2, PART_NAMES)
        ax.set_ylabel("ms / image (median)")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=8)
    save_figure(fig, path, title, fontsize=12, dpi=120)


def bench_export_parts(
    *,
    weights: WeightOptions,
    repos: Sequence[Path],
    batches: Sequence[int] = (1, 8),
    repeats: int = 3,
    out: Path | None = None,
) -> Results:
    """Each part of each repository and of the eager model they were exported from (`exported_weights` of the
    first), `repeats` timed runs each at each batch size, interleaved; writes export_parts.json and
    export_parts.png to `out` (default `results_dir`)."""
    manifests = {str(repo): Manifest.read(repo) for repo in repos}
    model = exported_weights(weights, repos[0]).load()
    specs = {part: spec for part, spec in part_specs(model.cfg).items() if part in PART_NAMES}  # not the evidence
    pixels = synthetic_pixels(max(batches), model.cfg.image_size)
    tensors = eager_tensors(model, pixels)
    variants = {"eager": {part: spec.module(model) for part, spec in specs.items()}}
    for repo, manifest in manifests.items():
        label = f"{Path(repo).name}: {manifest.runtime} {manifest.precision}"
        variants[label] = {part: load_part(Path(repo), part) for part in PART_NAMES}

    load_before = os.getloadavg()
    timings: dict[tuple[str, str, int], list[float]] = {}
    for part, spec in specs.items():
        for batch in batches:
            torch_args = [tensors[n][:batch] for n in spec.input_names]
            feeds = {n: tensors[n][:batch].numpy() for n in spec.input_names}
            calls = {
                name: partial(parts[part], *torch_args) if name == "eager" else partial(parts[part], feeds)
                for name, parts in variants.items()
            }
            with torch.inference_mode():
                for fn in calls.values():
                    fn()  # warm-up
                for _ in range(repeats):  # interleaved: drift and neighbours' load hit every variant alike
                    for name, fn in calls.items():
                        timings.setdefault((part, name, batch), []).append(_seconds(fn) / batch)
            print(f"{part} batch {batch}: timed", flush=True)
    load_after = os.getloadavg()

    rows = []
    for (part, name, batch), seconds in timings.items():
        eager = statistics.median(timings[part, "eager", batch])
        ms = statistics.median(seconds) * 1e3
        rows.append(
            {
                "part": part,
                "variant": name,
                "batch": batch,
                "ms_per_image": round(ms, 2),
                "ms_per_image_min": round(min(seconds) * 1e3, 2),
                "speedup_vs_eager": round(eager * 1e3 / ms, 3),
            }
        )
    info = machine("cpu")
    date = datetime.date.today().isoformat()
    out_dir = results_dir(info, out)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"exported parts vs eager, {info['cpu']} ({info['cores']} cores), {date}"
    report = {
        "title": title,
        "machine": info,
        "versions": tool_versions(commit=True),
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [load_before, load_after],
        "repeats": repeats,
        "rows": rows,
        "exports": {repo: _export_summary(m) for repo, m in manifests.items()},
    }
    (out_dir / "export_parts.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(rows, list(batches), out_dir / "export_parts.png", title)
    return Results.written(report, out_dir, "export_parts.json", "export_parts.png")


def summary_lines(report: dict) -> list[str]:
    """ms/image and the ratio to eager per part, variant and batch; then each export's size, export time and
    worst error per part, from its manifest."""
    (load_before, *_), (load_after, *_) = report["load_average_before_after"]
    lines = [
        f"\n{report['title']}; load average {load_before:.1f} → {load_after:.1f}",
        f"{'part':12s} {'variant':38s} {'batch':>5s} {'ms/img':>9s} {'× eager':>8s}",
    ]
    for r in sorted(report["rows"], key=lambda r: (PART_NAMES.index(r["part"]), r["batch"])):
        lines.append(
            f"{r['part']:12s} {r['variant']:38s} {r['batch']:5d} {r['ms_per_image']:9.1f} {r['speedup_vs_eager']:8.2f}"
        )
    lines.append(f"\n{'export':38s} {'part':12s} {'MB':>8s} {'export s':>9s}  worst error vs eager")
    for repo, export in report["exports"].items():
        for part, entry in export["parts"].items():
            worst = ", ".join(
                f"{k} {v['agreement']:.2%}" if "agreement" in v else f"{k} {v['max_abs']:.2g}"
                for k, v in entry["worst"].items()
            )
            size, secs = entry["bytes"] / 1e6, entry["export_seconds"]
            lines.append(
                f"{Path(repo).name + ' ' + export['precision']:38s} {part:12s} {size:8.1f} {secs:9.1f}  {worst}"
            )
    return lines
