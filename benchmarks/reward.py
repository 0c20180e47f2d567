"""The reward benchmark: RL-sized calls of D³QE as a reward, served vs the eager model in-process.

    d3qe bench-reward --repo build/model_repository [--sizes 64:2 512:1]

Each call scores N images of 512×512 uint8 RGB (seeded, smooth colour fields with noise, as a generator's
samples), as a trainer's reward function would: through the server's `d3qe_rgb` entrance with
`client.reward.D3QEReward` (raw pixels, chunked, `--concurrency` requests in flight), and with the eager
model in this process on the same images (`serving.inprocess.score_eager`, batch 8), in one run. Per
runtime and call size: calls/s, images/s, p50/p99 call latency, and the largest |Δreward| between the
two. Writes `reward.json` and `reward.png` under `benchmarks/results/<machine>-<date>/` (under the working
directory).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from d3qe_serve.benchmarks import Results, exported_weights, report_header, results_dir, save_figure, weights_record
from d3qe_serve.serving.host import machine
from d3qe_serve.serving.inprocess import WeightOptions
from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY


def generated_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n seeded uint8 [size, size, 3] images: bilinear-upsampled colour fields plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (size // 32, size // 32, 3), dtype=np.uint8))
        field = np.asarray(low.resize((size, size), Image.BILINEAR), dtype=np.float32)
        out[i] = np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
    return out


def _timed_calls(name: str, reward, images: np.ndarray, calls: int) -> tuple[list[float], np.ndarray]:
    latencies, scores = [], None
    for _ in tqdm(range(calls), desc=f"{name}, {len(images)} images a call", unit="call", file=sys.stderr):
        start = time.perf_counter()
        scores = reward(images)
        latencies.append(time.perf_counter() - start)
    return latencies, scores


def _row(runtime: str, n: int, latencies: list[float], delta: float | None) -> dict:
    total = sum(latencies)
    return {
        "runtime": runtime,
        "images_per_call": n,
        "calls": len(latencies),
        "calls_per_s": len(latencies) / total,
        "images_per_s": n * len(latencies) / total,
        "p50_call_s": statistics.median(latencies),
        "p99_call_s": float(np.quantile(latencies, 0.99)),
        "max_abs_reward_delta_vs_eager": delta,
    }


def plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['runtime'].split()[0]}\n{r['images_per_call']}/call" for r in rows]
    colours = ["tab:gray" if "eager" in r["runtime"] else "tab:blue" for r in rows]
    left.bar(labels, [r["images_per_s"] for r in rows], color=colours)
    left.set_ylabel("images/s")
    right.bar(labels, [r["p50_call_s"] for r in rows], label="p50")
    right.scatter(labels, [r["p99_call_s"] for r in rows], color="black", marker="_", s=400, label="p99", zorder=3)
    right.set_ylabel("seconds per call")
    right.legend()
    save_figure(fig, path, title)


def bench_reward(
    *,
    weights: WeightOptions,
    repo: Path = DEFAULT_REPOSITORY,
    url: str | None = None,
    sizes: Sequence[tuple[int, int]] = ((64, 2), (512, 1)),
    image_size: int = 512,
    chunk_size: int = 8,
    concurrency: int = 4,
    out: Path | None = None,
) -> Results:
    """Reward calls of each of `sizes` (images per call, timed calls) on `image_size`² images: served (the server
    at `url`, else one started on `repo`; `chunk_size` images a request, `concurrency` in flight) and eager in
    this process (the weights `repo` was exported from). Writes reward.json and reward.png to `out` (default
    `results_dir`)."""
    import torch

    from d3qe_serve.client.reward import D3QEReward
    from d3qe_serve.serving.inprocess import score_eager
    from d3qe_serve.serving.server import served

    reference = exported_weights(weights, repo)
    model = reference.load()
    info = machine("cpu")

    def eager(images: np.ndarray) -> np.ndarray:
        results = score_eager(model, ((str(i), a) for i, a in enumerate(images)))
        return np.array([1 - r.probability for r in results], np.float32)

    rows = []
    with torch.inference_mode(), served(url, repo) as (grpc_url, _):
        reward = D3QEReward(grpc_url, chunk_size=chunk_size, concurrency=concurrency)
        reward.wait_until_ready(600)
        warm = generated_images(1, image_size, seed=99)
        reward(warm), eager(warm)
        for n, calls in sizes:
            images = generated_images(n, image_size)
            eager_lat, eager_scores = _timed_calls("eager in-process", eager, images, calls)
            served_lat, (served_scores, _) = _timed_calls("served d3qe_rgb", reward, images, calls)
            delta = float(np.abs(served_scores - eager_scores).max())
            rows += [_row("eager fp32 in-process", n, eager_lat, None), _row("served d3qe_rgb", n, served_lat, delta)]
            print(json.dumps(rows[-2:], indent=1), file=sys.stderr, flush=True)
        reward.close()
    report = {
        **report_header(f"D³QE as a reward, {image_size}² uint8", info),
        "model": weights_record(reference),
        "repository": str(repo),
        "settings": {
            "chunk_size": chunk_size,
            "concurrency": concurrency,
            "sizes": [f"{n}:{calls}" for n, calls in sizes],
        },
        "rows": rows,
    }
    out_dir = results_dir(info, out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reward.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(out_dir / "reward.png", rows, report["title"])
    return Results.written(report, out_dir, "reward.json", "reward.png")


def summary_lines(report: dict) -> list[str]:
    """Images/s, calls/s and call latency per runtime and call size, with the largest |Δreward| vs eager."""
    lines = []
    for r in report["rows"]:
        delta = r["max_abs_reward_delta_vs_eager"]
        lines.append(
            f"{r['runtime']:24} {r['images_per_call']:4} images/call: {r['images_per_s']:.3f} images/s, "
            f"{r['calls_per_s']:.4f} calls/s, p50 {r['p50_call_s']:.1f} s, p99 {r['p99_call_s']:.1f} s"
            + ("" if delta is None else f", max |Δreward| vs eager {delta:.1e}")
        )
    return lines
