"""Scoring files: image and video paths and folders through any `Scorer` (the server's client, or in-process).

`expand_paths` turns the paths and folders given into files, `partition` splits them into images and
videos (`VIDEO_SUFFIXES`), and `score_videos` scores each video's sampled frames (`client.video`). Images
are scored by the scorer itself: `score((str(p), p) for p in images)`. An animated GIF is an image,
scored by its first frame: convert it to a video file for per-frame scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from d3qe_serve.client.results import DEFAULT_THRESHOLD, Scorer
from d3qe_serve.client.video import DEFAULT_FPS, VIDEO_SUFFIXES, VideoError, VideoResult, plot_timeline, score_video

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def expand_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given (whatever their suffix: a bad one gets its own error); folders recursively, images and
    videos only."""
    wanted = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in wanted)
        else:
            yield p


def partition(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(images, videos), each in the order given: a video is a file with a suffix of `VIDEO_SUFFIXES`."""
    images, videos = [], []
    for p in paths:
        (videos if p.suffix.lower() in VIDEO_SUFFIXES else images).append(p)
    return images, videos


def score_videos(
    videos: Iterable[Path],
    score: Scorer,
    *,
    fps: float = DEFAULT_FPS,
    every_frame: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    plot_dir: Path | None = None,
) -> Iterator[VideoResult]:
    """Each video's result, in order (`score_video`); one that cannot be decoded gives its failed result.
    `plot_dir`: a timeline PNG per decoded video there, named after the video."""
    for path in videos:
        try:
            result = score_video(path, score, fps=fps, every_frame=every_frame, threshold=threshold)
        except VideoError as e:
            result = VideoResult.failed(str(path), str(e))
        if plot_dir is not None and result.error is None:
            plot_timeline(result, Path(plot_dir) / f"{path.name}.png")
        yield result
