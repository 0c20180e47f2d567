"""The bulk benchmark: `d3qe bulk` (Ray Data actors) against `d3qe score` (one process) on the same images.

    python -m benchmarks.bulk --repo build/model_repository [--images 300] [--small 16] [--batch-size 8]

The fidelity corpus' first `--images` files (`export.corpus`, written to a temporary folder) are scored
by both commands on the export at `--repo`, in one run: `d3qe score --runtime exported` with 1 thread
and with every core, and `d3qe bulk` on a local Ray with 1 actor of 1 CPU, one 1-CPU actor per core,
and 1 actor holding every core. Each is run twice, on `--small` images and on all of them, so that its
fixed cost (Ray's start, the actors' start and model load, or the process' model load) and its steady
throughput are told apart: steady images/s = (N - n) / (t_N - t_n). Per actor, that steady throughput
is what the README's scaling argument multiplies. Every row of bulk's largest run is checked against
score's (same sources, same errors, logits). Writes `bulk-<repo>.json` and `.png` under
`benchmarks/results/<machine>-<date>/`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from d3qe_serve.benchmarks import report_header, results_dir, save_figure
from d3qe_serve.cli import bulk
from d3qe_serve.cli.main import main as d3qe
from d3qe_serve.export.corpus import corpus, corpus_digest, write_corpus
from d3qe_serve.serving.host import machine
from d3qe_serve.serving.manifest import Manifest
from d3qe_serve.serving.server import DEFAULT_REPOSITORY


def run_score(folder: Path, repo: Path, threads: int, batch_size: int) -> tuple[float, dict[str, dict]]:
    """`d3qe score --runtime exported --json` in this process: wall seconds, and its rows by source."""
    argv = ["score", "--runtime", "exported", "--repo", str(repo), "--threads", str(threads)]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        d3qe([*argv, "--batch-size", str(batch_size), "--json", str(folder)])
    seconds = time.perf_counter() - start
    return seconds, {r["source"]: r for r in map(json.loads, out.getvalue().splitlines())}


def run_bulk(folder: Path, repo: Path, out: Path, actors: int, cpus: int, batch_size: int) -> tuple[float, dict]:
    """`d3qe bulk` on a local Ray it starts and stops: wall seconds (Ray's start included), and its report."""
    parser = argparse.ArgumentParser()
    bulk.add_arguments(parser)
    options = {"--out": out, "--repo": repo, "--concurrency": actors, "--num-cpus": cpus, "--batch-size": batch_size}
    args = parser.parse_args([str(folder), *(str(x) for option in options.items() for x in option)])
    start = time.perf_counter()
    report = bulk.bulk(args)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY, help="the export both commands run")
    p.add_argument("--images", type=int, default=300, help="fidelity-corpus images scored by every configuration")
    p.add_argument("--small", type=int, default=16, help="images of the short run that measures fixed costs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>)")
    args = p.parse_args(argv)
    if not 0 < args.small < args.images:
        p.error("need 0 < --small < --images")

    cores = len(os.sched_getaffinity(0))
    manifest = Manifest.read(args.repo)
    info = machine("cpu")
    items = corpus(args.images)
    configs = [("score", f"1 process, {t} thread{'s' * (t > 1)}", 1, t) for t in sorted({1, cores})]
    configs += [("bulk", f"{a} actor{'s' * (a > 1)} × {c} CPU{'s' * (c > 1)}", a, c) for a, c in [(1, 1), (cores, 1)]]
    configs += [("bulk", f"1 actor × {cores} CPUs", 1, cores)] if cores > 1 else []
    rows, parity = [], None
    with tempfile.TemporaryDirectory(prefix="d3qe-bulk-bench-") as tmp:
        full, small = Path(tmp) / "full", Path(tmp) / "small"
        write_corpus(full, items)
        write_corpus(small, items[: args.small])
        for i, (command, config, workers, cpus) in enumerate(configs):
            timings = []
            for folder, n in ((small, args.small), (full, len(items))):
                print(f"[{i + 1}/{len(configs)}] d3qe {command}, {config}: {n} images …", file=sys.stderr, flush=True)
                if command == "score":
                    seconds, score_rows = run_score(folder, args.repo, cpus, args.batch_size)
                else:
                    out = Path(tmp) / f"out-{i}-{n}.parquet"
                    seconds, report = run_bulk(folder, args.repo, out, workers, cpus, args.batch_size)
                    assert report["scored"] == n, report  # one row per image, every run from an empty output
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
                parity = compare(pq.read_table(out).to_pylist(), score_rows)
    report = {
        **report_header(f"d3qe bulk vs d3qe score, {len(items)} images, {_model(manifest)}", info),
        "repository": str(args.repo),
        "manifest_id": manifest.id,
        "model": {"config": manifest.config, "runtime": manifest.describe(), "seeded": manifest.seeded_weights},
        "corpus": {"images": len(items), "digest": corpus_digest(items)},
        "batch_size": args.batch_size,
        "parity_bulk_vs_score": parity,
        "rows": rows,
    }
    out_dir = results_dir(info, args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bulk-{args.repo.name}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(out_dir / f"{stem}.png", rows, report["title"])
    for r in rows:
        print(
            f"d3qe {r['command']:5} {r['config']:24} {r['end_to_end_images_per_s']:7.2f} images/s end to end, "
            f"{r['steady_images_per_s']:7.2f} steady ({r['steady_images_per_s_per_worker']:.2f} per worker), "
            f"fixed {r['fixed_seconds']:.1f} s"
        )
    print(f"parity, bulk vs score: {parity}")
    print(f"wrote {out_dir}/{stem}.json, {stem}.png")
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
