"""`d3qe bench-video`: frames/s of decoding, of scoring through the server, and of both, on a generated clip
(`benchmarks.video`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY, help="served (started here)")
    p.add_argument("--url", help="a running server instead of one started on --repo")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the generated 720p clip")
    p.add_argument("--rate", type=int, default=30, help="the clip's frame rate")
    p.add_argument("--fps", type=float, default=2.0, help="frames scored per second of video")
    p.add_argument("--every-frame", action="store_true", help="also time decoding every frame (no scoring)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>)")


def run(args: argparse.Namespace) -> int:
    from d3qe_serve.benchmarks.video import bench_video, summary_lines

    results = bench_video(
        repo=args.repo,
        url=args.url,
        seconds=args.seconds,
        rate=args.rate,
        fps=args.fps,
        every_frame=args.every_frame,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        out=args.out,
    )
    print("\n".join(summary_lines(results.report)))
    print(f"wrote {results.folder}/video.json, video.png")
    return 0
