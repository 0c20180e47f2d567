"""The reward benchmark: RL-sized calls of D³QE as a reward, served vs the eager model in-process.

    python -m benchmarks.reward --repo build/model_repository [--sizes 64:2 512:1]

Each call scores N images of 512×512 uint8 RGB (seeded, smooth colour fields with noise, as a generator's
samples), as a trainer's reward function would: through the server's `d3qe_rgb` entrance with
`client.reward.D3QEReward` (raw pixels, chunked, `--concurrency` requests in flight), and with the eager
model in this process on the same images (`serving.inprocess.score_eager`, batch 8), in one run. Per
runtime and call size: calls/s, images/s, p50/p99 call latency, and the largest |Δreward| between the
two. Writes `reward.json` and `reward.png` under `benchmarks/results/<machine>-<date>/`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from d3qe_serve.benchmarks import report_header, results_dir, save_figure
from d3qe_serve.serving.host import machine
from d3qe_serve.serving.inprocess import add_weight_arguments


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=Path("build/model_repository"), help="served (and its weights)")
    p.add_argument("--url", help="a running server instead of one started on --repo")
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["64:2", "512:1"],
        metavar="N[:CALLS]",
        help="images per call, and timed calls of that size per runtime (default 2), after one warm-up image",
    )
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    add_weight_arguments(p)
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>)")
    args = p.parse_args(argv)


    import torch

    from d3qe_serve.benchmarks.bench import eager_reference
    from d3qe_serve.client.reward import D3QEReward
    from d3qe_serve.d3qe import load_detector
    from d3qe_serve.serving.inprocess import score_eager
    from d3qe_serve.serving.server import served

    args.repo = [args.repo]  # eager_reference reads the first repository's weights
    ref = eager_reference(args)
    model = load_detector(
        args.checkpoint, args.vq_checkpoint, preset=ref["preset"], freq_bias=ref["freq_bias"], seed=ref["seed"]
    )
    info = machine("cpu")

    def eager(images: np.ndarray) -> np.ndarray:
        results = score_eager(model, ((str(i), a) for i, a in enumerate(images)))
        return np.array([1 - r.probability for r in results], np.float32)

    rows = []
    with torch.inference_mode(), served(args.url, args.repo[0]) as (url, _):
        reward = D3QEReward(url, chunk_size=args.chunk_size, concurrency=args.concurrency)
        reward.wait_until_ready(600)
        warm = generated_images(1, args.image_size, seed=99)
        reward(warm), eager(warm)
        for size in args.sizes:
            n, _, calls = size.partition(":")
            n, calls = int(n), int(calls or 2)
            images = generated_images(n, args.image_size)
            eager_lat, eager_scores = _timed_calls("eager in-process", eager, images, calls)
            served_lat, (served_scores, _) = _timed_calls("served d3qe_rgb", reward, images, calls)
            delta = float(np.abs(served_scores - eager_scores).max())
            rows += [_row("eager fp32 in-process", n, eager_lat, None), _row("served d3qe_rgb", n, served_lat, delta)]
            print(json.dumps(rows[-2:], indent=1), file=sys.stderr, flush=True)
        reward.close()
    report = {
        **report_header(f"D³QE as a reward, {args.image_size}² uint8", info),
        "model": ref,
        "repository": str(args.repo[0]),
        "settings": {"chunk_size": args.chunk_size, "concurrency": args.concurrency, "sizes": args.sizes},
        "rows": rows,
    }
    out_dir = results_dir(info, args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reward.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(out_dir / "reward.png", rows, report["title"])
    for r in rows:
        delta = r["max_abs_reward_delta_vs_eager"]
        print(
            f"{r['runtime']:24} {r['images_per_call']:4} images/call: {r['images_per_s']:.3f} images/s, "
            f"{r['calls_per_s']:.4f} calls/s, p50 {r['p50_call_s']:.1f} s, p99 {r['p99_call_s']:.1f} s"
            + ("" if delta is None else f", max |Δreward| vs eager {delta:.1e}")
        )
    print(f"wrote {out_dir}/reward.json, reward.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
