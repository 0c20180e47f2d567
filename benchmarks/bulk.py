"""The bulk benchmark: bulk scoring (`d3qe_serve.bulk`, Ray Data actors) against `d3qe score`'s in-process
scoring (one process) on the same images; `d3qe bench-bulk` runs it.

    d3qe bench-bulk --repo build/model_repository [--images 300] [--small 16] [--batch-size 8]

The fidelity corpus' first `images` files (`export.corpus`, written to a temporary folder) are scored
both ways on the export at `repo`, in one run: the export's parts in this process
(`serving.inprocess.score_exported`, as `d3qe score --runtime exported` runs them) with 1 thread and
with every core, and `bulk.pipeline.score_bulk` on a local Ray with 1 actor of 1 CPU, one 1-CPU actor
per core, and 1 actor holding every core. Each is run twice, on `small` images and on all of them, so
that its fixed cost (Ray's start, the actors' start and model load, or the process' model load) and its
steady throughput are told apart: steady images/s = (N - n) / (t_N - t_n). Per actor, that steady
throughput is what the scaling argument for a cluster multiplies. Every row of bulk's largest run is
checked against score's (same sources, same errors, logits). Writes `bulk-<repo>.json` and `.png` under
`results_dir` (`benchmarks/results/<machine>-<date>/`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from d3qe_serve.benchmarks import Results, report_header, results_dir, save_figure
from d3qe_serve.bulk.options import BulkOptions
from d3qe_serve.bulk.pipeline import BulkReport, score_bulk
from d3qe_serve.client.score import expand_paths
from d3qe_serve.errors import InputError
from d3qe_serve.export.corpus import corpus, corpus_digest, write_corpus
from d3qe_serve.serving.host import machine
from d3qe_serve.serving.inprocess import load_exported, score_exported
from d3qe_serve.serving.manifest import Manifest
from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY


def run_score(folder: Path, repo: Path, threads: int, batch_size: int) -> tuple[float, dict[str, dict]]:
    """`d3qe score --runtime exported`'s work in this process (the parts loaded, the folder's images scored):
    wall seconds, and the results by source."""
    start = time.perf_counter()
    runners = load_exported(repo, "cpu", threads)
    items = ((str(p), p) for p in expand_paths([folder]))
    results = list(score_exported(runners, items, batch_size=batch_size))
    seconds = time.perf_counter() - start
    return seconds, {r.source: r.as_dict() for r in results}


def run_bulk(folder: Path, repo: Path, out: Path, actors: int, cpus: int, batch_size: int) -> tuple[float, BulkReport]:
    """Bulk scoring on a local Ray it starts and stops: wall seconds (Ray's start included), and its report."""
    options = BulkOptions(str(folder), str(out), repo=repo, concurrency=actors, num_cpus=cpus, batch_size=batch_size)
    start = time.perf_counter()
    report = score_bulk(options)
    return time.perf_counter() - start, report


def steady(n_small: int, t_small: float, n: int, t: float) -> tuple[float, float]:
    """Steady images/s and fixed seconds from a small and a full run of the same configuration."""
    rate = (n - n_small) / (t - t_small)
    return rate, t_small - n_small / rate


def plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["config"].replace(", ", "\n") for r in rows]
    colours = ["tab:gray" if r["command"] == "score" else "tab:blue" for r in rows]
    x = range(len(rows))
    left.bar([i - 0.2 for i in x], [r["steady_images_per_s"] for r in rows], 0.4, color=colours, label="steady")
    left.bar([i + 0.2 for i in x], [r["end_to_end_images_per_s"] for r in rows], 0.4, color=colours, alpha=0.45)
    left.set_xticks(list(x), labels, fontsize=8)
    left.set_ylabel("images/s (solid: steady; pale: end to end, start-up included)")
    right.bar(labels, [r["steady_images_per_s_per_worker"] for r in rows], color=colours)
    right.set_xticks(list(x), labels, fontsize=8)
    right.set_ylabel("steady images/s per actor (score: per process)")
    save_figure(fig, path, title)


def bench_bulk(
    *,
    repo: Path | None = None,
    images: int = 300,
    small: int = 16,
    batch_size: int = 8,
    out: Path | None = None,
) -> Results:
    """Every configuration (see the module's docstring) on `images` corpus images and on the first `small` of
    them, on the export at `repo` (default `d3qe export`'s); writes bulk-<repo>.json and .png to `out` (default
    `results_dir`)."""
    if not 0 < small < images:
        raise InputError("need 0 < --small < --images")
    repo = Path(repo or DEFAULT_REPOSITORY)
    cores = len(os.sched_getaffinity(0))
    manifest = Manifest.read(repo)
    info = machine("cpu")
    items = corpus(images)
    configs = [("score", f"1 process, {t} thread{'s' * (t > 1)}", 1, t) for t in sorted({1, cores})]
    configs += [("bulk", f"{a} actor{'s' * (a > 1)} × {c} CPU{'s' * (c > 1)}", a, c) for a, c in [(1, 1), (cores, 1)]]
    configs += [("bulk", f"1 actor × {cores} CPUs", 1, cores)] if cores > 1 else []
    rows, parity = [], None
    with tempfile.TemporaryDirectory(prefix="d3qe-bulk-bench-") as tmp:
        full_folder, small_folder = Path(tmp) / "full", Path(tmp) / "small"
        write_corpus(full_folder, items)
        write_corpus(small_folder, items[:small])
        for i, (command, config, workers, cpus) in enumerate(configs):
            timings = []
            for folder, n in ((small_folder, small), (full_folder, len(items))):
                print(f"[{i + 1}/{len(configs)}] d3qe {command}, {config}: {n} images …", file=sys.stderr, flush=True)
                if command == "score":
                    seconds, score_rows = run_score(folder, repo, cpus, batch_size)
                else:
                    store = Path(tmp) / f"out-{i}-{n}.parquet"
                    seconds, bulk_report = run_bulk(folder, repo, store, workers, cpus, batch_size)
                    assert bulk_report.scored == n, bulk_report  # one row per image, every run from an empty output
                timings.append((n, seconds))
                print(f"      {seconds:.1f} s, {n / seconds:.2f} images/s end to end", file=sys.stderr, flush=True)
            rate, fixed = steady(*timings[0], *timings[1])
            rows.append(
                {
                    "command": command,
                    "config": config,
                    "workers": workers,
                    "cpus_per_worker": cpus,
                    "images": len(items),
                    "seconds": timings[1][1],
                    "end_to_end_images_per_s": len(items) / timings[1][1],
                    "small_run": {"images": timings[0][0], "seconds": timings[0][1]},
                    "steady_images_per_s": rate,
                    "steady_images_per_s_per_worker": rate / workers,
                    "fixed_seconds": fixed,
                }
            )
            if command == "bulk" and parity is None:
                parity = compare(pq.read_table(store).to_pylist(), score_rows)
    report = {
        **report_header(f"d3qe bulk vs d3qe score, {len(items)} images, {_model(manifest)}", info),
        "repository": str(repo),
        "manifest_id": manifest.id,
        "model": {"config": manifest.config, "runtime": manifest.describe(), "seeded": manifest.seeded_weights},
        "corpus": {"images": len(items), "digest": corpus_digest(items)},
        "batch_size": batch_size,
        "parity_bulk_vs_score": parity,
        "rows": rows,
    }
    out_dir = results_dir(info, out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bulk-{repo.name}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(out_dir / f"{stem}.png", rows, report["title"])
    return Results.written(report, out_dir, f"{stem}.json", f"{stem}.png")


def _model(manifest: Manifest) -> str:
    seeded = manifest.seeded_weights
    weights = f"{seeded['preset']} model, seeded weights" if seeded else f"model {manifest.checkpoint['file']}"
    return f"{weights}, {' '.join(manifest.describe())}"


def compare(bulk_rows: list[dict], score_rows: dict[str, dict]) -> dict:
    """Bulk's rows against score's: one per source, the same errors, the largest |Δlogit|."""
    same_sources = sorted(r["source"] for r in bulk_rows) == sorted(score_rows)
    same_errors = all((r["error"] is None) == (score_rows[r["source"]]["error"] is None) for r in bulk_rows)
    deltas = [abs(r["logit"] - score_rows[r["source"]]["logit"]) for r in bulk_rows if r["error"] is None]
    return {"same_sources": same_sources, "same_errors": same_errors, "max_abs_logit_delta": max(deltas, default=0.0)}
