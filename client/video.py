"""Videos: per-frame D³QE scores, a video score, and the time spans that look generated.

    from d3qe_serve.client.grpc_client import D3QEClient
    from d3qe_serve.client.video import score_video, plot_timeline

    with D3QEClient("localhost:8001", "d3qe_rgb") as client:
        result = score_video("clip.mp4", client, fps=2.0)   # or frames in memory: [(time_s, uint8 [H, W, 3]), ...]
    result.verdict, result.p_topk, result.fake_periods     # "generated", 0.93, [[12.0, 15.5, 0.97]]
    plot_timeline(result, "clip.png")

Decoding is PyAV's (the `video` extra): its wheels bundle FFmpeg, while torchcodec needs a system FFmpeg
of a matching version. Frames are decoded one at a time and sampled as they come (`fps`: the first frame
at or after each k/fps seconds, by its PTS × time_base; or `every_frame`), so a long video never sits in
memory. Each sampled frame becomes uint8 RGB pixels (`to_ndarray(format="rgb24")`) and is sent as it is
to the server's `d3qe_rgb` entrance, never re-encoded: a JPEG or PNG round trip would change the traces
D³QE reads. Any `Scorer` taking (source, uint8 [H, W, 3]) items scores them in-process instead
(`serving.inprocess.score_eager` with a model).

The video score (`p_topk`, and the verdict at `threshold`) is the mean P(generated) of the top tenth of
the frames (k = ceil(10 % of the scored frames)): a generated insert covering a tenth of the video or
more decides it, one outlying frame of a long video does not (below 10 frames, k = 1: the highest frame).
`p_mean` is reported beside it. `fake_periods` ([start_s, end_s, peak_P], the LAV-DF convention) come
from `fake_periods`: a centred moving average over `window` frames, then hysteresis (a span starts where
the smoothed P rises above `high` and ends where it falls below `low`), spans shorter than `min_duration`
dropped. A span runs from its first frame's time to its last frame's time plus the sample interval
(1/fps; with every frame, the median frame spacing).

A file that cannot be scored raises `VideoError` naming the file and the problem: missing, empty, not a
video, no video stream, a codec FFmpeg cannot decode, frames above `MAX_PIXELS` or below `MIN_SIDE` per
side, more than `max_frames` sampled frames, or a stream FFmpeg reports as corrupt or truncated while
decoding (its error log: the Matroska demuxer, for one, stops at a truncation without raising).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from d3qe_serve.client.grpc_client import D3QEClient
from d3qe_serve.client.results import DEFAULT_THRESHOLD, Scorer
from d3qe_serve.errors import MissingDependencyError, VideoError

VIDEO_SUFFIXES = {".mp4", ".m4v", ".webm", ".mkv", ".mov", ".avi"}
DEFAULT_FPS = 2.0
MAX_FRAMES = 100_000  # sampled frames per video: 100 000 at 2 fps is almost 14 hours
# d3qe.preprocess's limits per image (not imported: it needs torch), checked here before any frame is converted.
MAX_PIXELS = 50_000_000
MIN_SIDE = 16
TOP_FRACTION = 0.1  # p_topk averages the top tenth of the frames
HIGH, LOW, MIN_DURATION, WINDOW = 0.6, 0.4, 1.0, 3  # fake_periods' defaults

# A frame in memory: its time in seconds and its uint8 RGB pixels [H, W, 3].
Frame = tuple[float, np.ndarray]


@dataclass(frozen=True)
class FrameScore:
    time_s: float
    logit: float | None = None
    p_generated: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class VideoResult:
    """One video's scores: per frame, for the whole video (`p_mean`, `p_topk`, `verdict`), and its fake spans."""

    source: str
    fps: float | None = None  # the sampling rate; None: every frame
    interval_s: float | None = None  # the sample interval that ends each span
    frames: list[FrameScore] = field(default_factory=list)
    p_mean: float | None = None
    p_topk: float | None = None  # the video score the verdict is taken on
    verdict: str | None = None  # "generated" or "real"; None when no frame could be scored
    fake_periods: list[list[float]] = field(default_factory=list)  # [start_s, end_s, peak P]
    error: str | None = None

    @classmethod
    def failed(cls, source: str, error: str) -> VideoResult:
        return cls(source, error=error)

    @property
    def ok(self) -> bool:
        """Decoded, and every frame scored."""
        return self.error is None and all(f.error is None for f in self.frames)

    def as_dict(self) -> dict:
        return asdict(self)


def _av() -> Any:
    """PyAV, with FFmpeg's error log on in this thread (`Capture` reads it) and every message delivered."""
    try:
        import av
    except ImportError:
        raise MissingDependencyError("videos are decoded with PyAV: pip install 'd3qe-serve[video]'") from None
    level = av.logging.get_level()
    if level is None or level < av.logging.ERROR:
        av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)  # a second file with the same error must see it too
    return av


def _check_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise VideoError(f"{path}: frames are {width}×{height} pixels, above the {MAX_PIXELS}-pixel limit")
    if min(width, height) < MIN_SIDE:
        raise VideoError(f"{path}: frames are {width}×{height}, below the minimum of {MIN_SIDE} pixels per side")


def sample(frames: Iterable[tuple[float, Any]], fps: float) -> Iterator[tuple[float, Any]]:
    """The first frame at or after each k/fps seconds (k = 0, 1, …), in order; a frame stands for every tick it
    is the first at or after, so a gap in the video gives no duplicates."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    due = -math.inf  # the next tick not yet covered, in ticks
    for t, frame in frames:
        ticks = float(t) * fps + 1e-6  # float times of ticks (k/fps) may land a hair below
        if ticks >= due:
            yield t, frame
            due = math.floor(ticks) + 1


def _capped(frames: Iterable[Frame], source: str, max_frames: int) -> Iterator[Frame]:
    for n, frame in enumerate(frames, 1):
        if n > max_frames:
            raise VideoError(f"{source}: more than {max_frames} frames to score (max_frames)")
        yield frame


def _expected_frames(container: Any, stream: Any, fps: float | None) -> int | None:
    """Frames `decode_frames` will yield, from the file's metadata (None when it does not say)."""
    if fps is None:
        return stream.frames or None
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000  # AV_TIME_BASE
    else:
        return None
    return math.ceil(seconds * fps)


def decode_frames(
    path: str | Path, *, fps: float | None = DEFAULT_FPS, max_frames: int = MAX_FRAMES
) -> Iterator[Frame]:
    """(time_s, uint8 RGB [H, W, 3]) of a video file, sampled at `fps` (None: every frame), one at a time.

    Raises `VideoError` for a file that cannot be scored (see the module docstring), as soon as it shows.
    """
    return _Decoded(Path(path), fps, max_frames).frames()


@dataclass
class _Decoded:
    """A video file being decoded: `expected` (the metadata's frame count) is known once `frames()` has started."""

    path: Path
    fps: float | None
    max_frames: int
    expected: int | None = None

    def frames(self) -> Iterator[Frame]:
        path = self.path
        if not path.is_file():
            raise VideoError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise VideoError(f"{path}: empty file (0 bytes)")
        av = _av()
        with av.logging.Capture() as log:
            try:
                with av.open(str(path)) as container:
                    if not container.streams.video:
                        raise VideoError(f"{path}: no video stream")
                    stream = container.streams.video[0]
                    ctx = stream.codec_context
                    if ctx is None:
                        raise VideoError(f"{path}: unsupported video codec")
                    # One decoding thread: FFmpeg's worker threads log their errors outside this thread's
                    # Capture, and a corrupt stream would then decode "successfully" (seen with H.264).
                    ctx.thread_type, ctx.thread_count = "NONE", 1
                    if ctx.width and ctx.height:  # 0: not in the header; each frame is checked anyway
                        _check_size(path, ctx.width, ctx.height)
                    self.expected = _expected_frames(container, stream, self.fps)
                    if self.expected is not None and self.expected > self.max_frames:
                        raise VideoError(f"{path}: about {self.expected} frames to score, above {self.max_frames}")
                    timed = self._timed(container.decode(stream), stream, log)
                    picked = timed if self.fps is None else sample(timed, self.fps)
                    empty = True
                    for t, frame in _capped(picked, str(path), self.max_frames):
                        _check_size(path, frame.width, frame.height)
                        empty = False
                        yield t, frame.to_ndarray(format="rgb24")
            except av.FFmpegError as e:
                reasons = [getattr(e, "strerror", None) or str(e), *_logged_errors(log)]
                raise VideoError(f"{path}: not a decodable video ({'; '.join(dict.fromkeys(reasons))})") from e
        if empty:
            raise VideoError(f"{path}: no frame could be decoded")

    def _timed(self, decoded: Iterable[Any], stream: Any, log: list) -> Iterator[tuple[float, Any]]:
        """(time_s, frame): PTS × time_base (the frame's index at the average rate when it has no PTS); FFmpeg's
        error log checked after each frame and at the end, so a corrupt or truncated stream fails."""
        rate = float(stream.average_rate or 0) or None
        for i, frame in enumerate(decoded):
            _raise_logged(self.path, log)
            if frame.pts is not None and frame.time_base is not None:
                yield float(frame.pts * frame.time_base), frame
            elif rate:
                yield i / rate, frame
            else:
                raise VideoError(f"{self.path}: frames carry no timestamps")
        _raise_logged(self.path, log)


def _logged_errors(log: list) -> list[str]:
    """FFmpeg's messages at ERROR level or worse in a `Capture`d log, each once."""
    import av

    return list(dict.fromkeys(message.strip() for level, _, message in log if level <= av.logging.ERROR))


def _raise_logged(path: Path, log: list) -> None:
    if errors := _logged_errors(log):
        raise VideoError(f"{path}: corrupt or truncated video (FFmpeg: {'; '.join(errors)})")


def sample_interval(times: np.ndarray, fallback: float) -> float:
    """The median spacing of the frame times (`fallback` for fewer than two frames)."""
    gaps = np.diff(np.asarray(times, dtype=np.float64))
    gaps = gaps[gaps > 0]
    return float(np.median(gaps)) if gaps.size else fallback


def fake_periods(
    times: Iterable[float],
    probs: Iterable[float],
    *,
    high: float = HIGH,
    low: float = LOW,
    min_duration: float = MIN_DURATION,
    window: int = WINDOW,
    interval: float | None = None,
) -> list[list[float]]:
    """[start_s, end_s, peak P] of each span that looks generated, in time order.

    P is smoothed by a centred moving average over `window` frames (odd; 1: none; shorter at the ends); a
    span starts at the first frame whose smoothed P is above `high` and takes in the frames up to the last
    one before the smoothed P falls below `low`. start_s is that first frame's time, end_s the last frame's
    time plus `interval` (default: the median frame spacing); peak P is the highest unsmoothed P in the span.
    Spans shorter than `min_duration` seconds are dropped.
    """
    t = np.asarray(list(times), dtype=np.float64)
    p = np.asarray(list(probs), dtype=np.float64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"times and probs must be two 1-D sequences of one length, got {t.shape} and {p.shape}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd number of frames >= 1, got {window}")
    if not low <= high:
        raise ValueError(f"low must be <= high, got low={low}, high={high}")
    if t.size == 0:
        return []
    step = sample_interval(t, 0.0) if interval is None else interval
    kernel = np.ones(window)
    smooth = np.convolve(p, kernel, "same") / np.convolve(np.ones_like(p), kernel, "same")
    spans, start = [], None
    for i, s in enumerate(smooth):
        if start is None and s > high:
            start = i
        elif start is not None and s < low:
            spans.append((start, i - 1))
            start = None
    if start is not None:
        spans.append((start, len(smooth) - 1))
    periods = []
    for a, b in spans:
        begin, end = float(t[a]), float(t[b]) + step
        if end - begin >= min_duration:
            periods.append([begin, end, float(p[a : b + 1].max())])
    return periods


@dataclass(frozen=True)
class SpanRule:
    """`fake_periods`' settings, passed as one: when frames make a span that looks generated."""

    high: float = HIGH
    low: float = LOW
    min_duration: float = MIN_DURATION
    window: int = WINDOW

    def periods(
        self, times: Iterable[float], probs: Iterable[float], interval: float | None = None
    ) -> list[list[float]]:
        return fake_periods(times, probs, **asdict(self), interval=interval)


def top_mean(probs: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """The mean of the highest ceil(fraction · n) values."""
    k = max(1, math.ceil(fraction * len(probs)))
    return float(np.sort(probs)[-k:].mean())


def summarize(
    source: str,
    frames: list[FrameScore],
    *,
    fps: float | None,
    threshold: float = DEFAULT_THRESHOLD,
    spans: SpanRule = SpanRule(),
) -> VideoResult:
    """The video's result from its frame scores; failed frames take no part in the scores or the spans."""
    scored = [f for f in frames if f.error is None]
    if not scored:
        return VideoResult(source, fps, None, frames, error="no frame could be scored" if frames else None)
    times = np.array([f.time_s for f in scored])
    probs = np.array([f.p_generated for f in scored])
    interval = 1 / fps if fps is not None else sample_interval(times, 0.0)
    p_topk = top_mean(probs)
    periods = spans.periods(times, probs, interval)
    verdict = "generated" if p_topk > threshold else "real"
    return VideoResult(source, fps, interval, frames, float(probs.mean()), p_topk, verdict, periods)


def score_video(
    video: str | Path | Iterable[Frame],
    scorer: D3QEClient | Scorer,
    *,
    fps: float = DEFAULT_FPS,
    every_frame: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    max_frames: int = MAX_FRAMES,
    spans: SpanRule = SpanRule(),
    source: str | None = None,
    progress: bool = True,
) -> VideoResult:
    """Score a video file, or frames in memory ((time_s, uint8 [H, W, 3]) pairs, sampled the same way).

    `scorer`: a `D3QEClient` on the server's `d3qe_rgb` entrance (batches, requests in flight), or any
    `Scorer` taking (source, pixels) items. A frame that fails to score is reported with its error and left
    out of the video's scores; a file that cannot be decoded raises `VideoError`.
    """
    rate = None if every_frame else fps
    score: Scorer = scorer.score if isinstance(scorer, D3QEClient) else scorer
    decoded = None
    if isinstance(video, str | Path):
        source = source or str(video)
        decoded = _Decoded(Path(video), rate, max_frames)
        frames: Iterable[Frame] = decoded.frames()
    else:
        source = source or "frames"
        frames = _capped(video if rate is None else sample(video, rate), source, max_frames)
    times: list[float] = []

    def items() -> Iterator[tuple[str, np.ndarray]]:
        for t, pixels in frames:
            times.append(t)
            yield f"{source}@{t:.3f}s", pixels

    scores = []
    with tqdm(desc=Path(source).name, unit="frame", file=sys.stderr, disable=not progress) as bar:
        for r in score(items()):
            if decoded is not None and bar.total is None and decoded.expected:
                bar.total = decoded.expected
            bar.update()
            scores.append(r)
    # Every `Scorer` keeps input order, a failed frame in its own slot: the i-th result is the i-th frame's.
    frame_scores = [
        FrameScore(t, r.logit, r.probability) if r.ok else FrameScore(t, error=r.error)
        for t, r in zip(times, scores, strict=True)
    ]
    return summarize(source, frame_scores, fps=rate, threshold=threshold, spans=spans)


def plot_timeline(result: VideoResult, path: str | Path, *, spans: SpanRule = SpanRule()) -> Path:
    """A PNG of P(generated) over time: the frames, the spans of `fake_periods` shaded, the hysteresis lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [f for f in result.frames if f.error is None]
    fig, ax = plt.subplots(figsize=(10, 3))
    for start, end, _ in result.fake_periods:
        ax.axvspan(start, end, color="tab:red", alpha=0.2, lw=0)
    ax.plot([f.time_s for f in scored], [f.p_generated for f in scored], ".-", color="tab:blue", lw=1, ms=3)
    ax.axhline(spans.high, color="tab:red", ls="--", lw=0.8, label=f"high {spans.high:g}")
    ax.axhline(spans.low, color="tab:green", ls="--", lw=0.8, label=f"low {spans.low:g}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("P(generated)")
    score = "no frame scored" if result.p_topk is None else f"{result.verdict}, top-10% P {result.p_topk:.3f}"
    ax.set_title(f"{Path(result.source).name}: {score}", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
