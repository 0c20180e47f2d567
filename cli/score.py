"""`d3qe score`: score image and video files through the Triton server (default) or an in-process runtime.

Videos (`VIDEO_SUFFIXES`) are decoded here and their sampled frames sent as RGB pixels (the server's
`--video-model` entrance, `d3qe_rgb`; see `client.video`); each gives one summary line, or with `--json`
one object holding every frame's score and its `fake_periods`. An animated GIF stays an image, scored
by its first frame: convert it to a video file for per-frame scores. `--csv` holds one row per image and
takes no videos.

The runtime options are `cli.options`' (`d3qe eval` takes them too).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from d3qe_serve.cli.options import add_runtime_arguments, local_threshold, open_scorer
from d3qe_serve.client.results import ScoreResult
from d3qe_serve.client.score import expand_paths, partition, score_videos
from d3qe_serve.client.video import DEFAULT_FPS, VIDEO_SUFFIXES, VideoResult
from d3qe_serve.contract import RGB_ENTRANCE
from d3qe_serve.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="image and video files, and folders (searched recursively)")
    add_runtime_arguments(p)
    video = p.add_argument_group("videos (" + " ".join(sorted(VIDEO_SUFFIXES)) + ")")
    video.add_argument("--fps", type=float, default=DEFAULT_FPS, help="frames scored per second of video")
    video.add_argument("--every-frame", action="store_true", help="score every frame (not --fps)")
    video.add_argument("--plot", type=Path, metavar="DIR", help="write a timeline PNG per video into DIR")
    video.add_argument("--video-model", default=RGB_ENTRANCE, help="server: the ensemble taking decoded RGB pixels")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="fmt", action="store_const", const="json", help="one JSON object per line")
    fmt.add_argument("--csv", dest="fmt", action="store_const", const="csv")
    p.set_defaults(fmt="text")


def write_results(results: Iterable[ScoreResult], fmt: str, out: TextIO | None = None) -> int:
    """Print one row per image (to stdout as it is at the call); returns the number of failed images."""
    out = out or sys.stdout
    failed = 0
    writer = None
    for r in results:
        failed += not r.ok
        if fmt == "json":
            print(json.dumps(r.as_dict()), file=out, flush=True)
        elif fmt == "csv":
            if writer is None:
                writer = csv.DictWriter(out, fieldnames=list(r.as_dict()))
                writer.writeheader()
            writer.writerow(r.as_dict())
        elif r.ok:
            print(f"{r.source}\tlogit={r.logit:+.4f}\tp={r.probability:.4f}\t{r.verdict}", file=out, flush=True)
        else:
            print(f"{r.source}\tERROR: {r.error}", file=out, flush=True)
    return failed


def write_video(result: VideoResult, fmt: str, out: TextIO | None = None) -> None:
    """Print a video's result: its JSON object (every field), or one summary line."""
    out = out or sys.stdout
    if fmt == "json":
        print(json.dumps(result.as_dict()), file=out, flush=True)
    elif result.error is not None:
        print(f"{result.source}\tERROR: {result.error}", file=out, flush=True)
    else:
        failed = sum(f.error is not None for f in result.frames)
        periods = ", ".join(f"{a:.2f}-{b:.2f}s (peak {p:.3f})" for a, b, p in result.fake_periods) or "none"
        print(
            f"{result.source}\tvideo, {len(result.frames)} frames"
            + (f" ({failed} failed)" if failed else "")
            + f"\tp_mean={result.p_mean:.4f}\tp_top10={result.p_topk:.4f}\t{result.verdict}"
            + f"\tfake periods: {periods}",
            file=out,
            flush=True,
        )


def run(args: argparse.Namespace) -> int:
    images, videos = partition(expand_paths(args.paths))
    if videos and args.fmt == "csv":
        raise InputError("--csv holds one row per image; score videos with --json or the text output")
    failed = 0
    with contextlib.ExitStack() as stack:
        score = None
        if images or not videos:  # nothing to score still checks the runtime, as it always has
            score = stack.enter_context(open_scorer(args))
            failed += write_results(score((str(p), p) for p in images), args.fmt)
        if videos:
            if score is None or args.runtime == "server":  # the server takes frames at another entrance
                score = stack.enter_context(open_scorer(args, model=args.video_model))
            for result in score_videos(
                videos,
                score,
                fps=args.fps,
                every_frame=args.every_frame,
                threshold=local_threshold(args),  # a video's verdict: --threshold, else upstream's
                plot_dir=args.plot,
            ):
                write_video(result, args.fmt)
                failed += not result.ok
    return 1 if failed else 0
