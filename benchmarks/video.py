"""The video benchmark: frames/s of decoding, of scoring through the server, and of both, on a generated clip.

    d3qe bench-video --repo build/model_repository [--seconds 60] [--every-frame]
    d3qe bench-video --url localhost:8001

The clip is generated here with PyAV in a temporary folder: `--seconds` of 1280×720 at `--rate` frames/s,
H.264 yuv420p (smooth colour fields drifting and a square moving across them). Measured at `--fps`
(default 2), one after another:

- decode: `client.video.decode_frames` alone (every frame of the clip is decoded; the sampled ones are
  converted to RGB), as sampled frames/s and as frames of the clip decoded per second;
- transfer + scoring: the sampled frames, decoded beforehand and held in memory, sent to the server's
  `d3qe_rgb` entrance by `D3QEClient` (`--batch-size` frames a request, `--concurrency` in flight);
- end to end: `client.video.score_video` on the file (decoding overlaps the requests in flight).

`--every-frame` also times decoding every frame to RGB (no scoring). Writes `video.json` and `video.png`
under `benchmarks/results/<machine>-<date>/` (under the working directory).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from d3qe_serve.benchmarks import Results, report_header, results_dir, save_figure
from d3qe_serve.serving.host import machine
from d3qe_serve.serving.server_config import DEFAULT_REPOSITORY

if TYPE_CHECKING:
    from d3qe_serve.client.grpc_client import D3QEClient


def make_clip(path: Path, seconds: float, rate: int, width: int = 1280, height: int = 720) -> Path:
    """A seeded H.264 yuv420p clip: a smooth colour field panning, and a bright square crossing it."""
    import av
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = round(seconds * rate)
    low = Image.fromarray(rng.integers(0, 256, (9, 16 + 8, 3), dtype=np.uint8))
    field = np.asarray(low.resize((width + width // 2, height), Image.BICUBIC))  # wider than a frame: it pans
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(frames):
            shift = i * (width // 2) // max(frames - 1, 1)
            rgb = field[:, shift : shift + width].copy()
            x, y = (i * 7) % (width - 96), height // 2 - 48 + int(60 * np.sin(i / rate))
            rgb[y : y + 96, x : x + 96] = (240, 240, 220)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path


def _timed(label: str, run) -> tuple[float, object]:
    print(f"{label} …", file=sys.stderr, flush=True)
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def decode_then_score(clip: Path, client: D3QEClient, fps: float, source_frames: int) -> list[dict]:
    """Rows for decoding the clip at `fps` into memory, then sending those frames to the server (a warm-up first).
    The decoded frames (2.8 MB each at 720p) are let go on return, before the end-to-end run."""
    from d3qe_serve.client.video import decode_frames

    seconds, frames = _timed(f"decoding at {fps:g} fps", lambda: list(decode_frames(clip, fps=fps)))
    decode = {"stage": f"decode @{fps:g} fps", "frames": len(frames), "seconds": seconds}
    decode["clip_frames_decoded_per_s"] = source_frames / seconds
    list(client.score([("warm-up", frames[0][1])]))
    items = [(f"{t:.3f}", rgb) for t, rgb in frames]
    seconds, results = _timed("transfer + scoring", lambda: list(client.score(items)))
    failed = sum(not r.ok for r in results)
    return [decode, {"stage": "transfer + scoring", "frames": len(items), "seconds": seconds, "failed": failed}]


def plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels = [r["stage"] for r in rows]
    ax.barh(labels, [r["frames_per_s"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(r["frames_per_s"], i, f" {r['frames_per_s']:.1f}", va="center", fontsize=8)
    ax.set_xlabel("frames/s (sampled frames; decode-every-frame: all frames)")
    ax.invert_yaxis()
    save_figure(fig, path, title, fontsize=9)


def bench_video(
    *,
    repo: Path = DEFAULT_REPOSITORY,
    url: str | None = None,
    seconds: float = 60.0,
    rate: int = 30,
    fps: float = 2.0,
    every_frame: bool = False,
    batch_size: int = 8,
    concurrency: int = 4,
    out: Path | None = None,
) -> Results:
    """A `seconds` long 720p clip at `rate` frames/s, scored at `fps` by the server at `url`, else by one started
    on `repo` (`batch_size` frames a request, `concurrency` in flight); `every_frame`: also time decoding every
    frame. Writes video.json and video.png to `out` (default `results_dir`)."""
    from d3qe_serve.client.grpc_client import D3QEClient
    from d3qe_serve.client.video import decode_frames, score_video
    from d3qe_serve.contract import RGB_ENTRANCE
    from d3qe_serve.serving.manifest import Manifest
    from d3qe_serve.serving.server import served

    info = machine("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, served(url, repo) as (grpc_url, _):
        elapsed, clip = _timed(
            f"encoding a {seconds:g} s 720p clip",
            lambda: make_clip(Path(tmp) / "clip.mp4", seconds, rate),
        )
        source_frames = round(seconds * rate)
        print(f"  {source_frames / elapsed:.1f} frames/s encoded", file=sys.stderr)

        client = D3QEClient(grpc_url, RGB_ENTRANCE, batch_size=batch_size, concurrency=concurrency)
        model = client.wait_until_ready(600)
        rows += decode_then_score(clip, client, fps, source_frames)
        if every_frame:
            every, count = _timed("decoding every frame", lambda: sum(1 for _ in decode_frames(clip, fps=None)))
            rows.append({"stage": "decode every frame", "frames": count, "seconds": every})
        took, result = _timed("end to end", lambda: score_video(clip, client, fps=fps))
        rows.append({"stage": f"end to end @{fps:g} fps", "frames": len(result.frames), "seconds": took})
        client.close()
    for r in rows:
        r["frames_per_s"] = r["frames"] / r["seconds"]
    served_model = {"name": model.name, "platform": model.platform, "max_batch_size": model.max_batch_size}
    if not url:
        manifest = Manifest.read(repo)
        served_model.update(
            runtime=manifest.runtime,
            precision=manifest.precision,
            checkpoint=manifest.checkpoint,
            seeded_weights=manifest.seeded_weights,
        )
    report = {
        **report_header(f"D³QE on video, {seconds:g} s 1280×720 H.264 @{rate} fps", info),
        "served": served_model,
        "repository": None if url else str(repo),
        "settings": {
            "seconds": seconds,
            "rate": rate,
            "fps": fps,
            "batch_size": batch_size,
            "concurrency": concurrency,
        },
        "rows": rows,
    }
    out_dir = results_dir(info, out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "video.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(out_dir / "video.png", rows, report["title"])
    return Results.written(report, out_dir, "video.json", "video.png")


def summary_lines(report: dict) -> list[str]:
    """Frames, seconds and frames/s of each stage."""
    return [
        f"{r['stage']:24} {r['frames']:6} frames in {r['seconds']:7.2f} s: {r['frames_per_s']:8.1f} frames/s"
        for r in report["rows"]
    ]
