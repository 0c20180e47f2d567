"""The video benchmark: frames/s of decoding, of scoring through the server, and of both, on a generated clip.

    python -m benchmarks.video --repo build/model_repository [--seconds 60] [--every-frame]
    python -m benchmarks.video --url localhost:8001

The clip is generated here with PyAV in a temporary folder: `--seconds` of 1280×720 at `--rate` frames/s,
H.264 yuv420p (smooth colour fields drifting and a square moving across them). Measured at `--fps`
(default 2), one after another:

- decode: `client.video.decode_frames` alone (every frame of the clip is decoded; the sampled ones are
  converted to RGB), as sampled frames/s and as frames of the clip decoded per second;
- transfer + scoring: the sampled frames, decoded beforehand and held in memory, sent to the server's
  `d3qe_rgb` entrance by `D3QEClient` (`--batch-size` frames a request, `--concurrency` in flight);
- end to end: `client.video.score_video` on the file (decoding overlaps the requests in flight).

`--every-frame` also times decoding every frame to RGB (no scoring). Writes `video.json` and `video.png`
under `benchmarks/results/<machine>-<date>/`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from d3qe_serve.benchmarks import report_header, results_dir, save_figure
from d3qe_serve.serving.host import machine

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=Path("build/model_repository"), help="served (started here)")
    p.add_argument("--url", help="a running server instead of one started on --repo")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the generated 720p clip")
    p.add_argument("--rate", type=int, default=30, help="the clip's frame rate")
    p.add_argument("--fps", type=float, default=2.0, help="frames scored per second of video")
    p.add_argument("--every-frame", action="store_true", help="also time decoding every frame (no scoring)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>)")
    args = p.parse_args(argv)

    from d3qe_serve.client.grpc_client import D3QEClient
    from d3qe_serve.client.video import VIDEO_MODEL, decode_frames, score_video
    from d3qe_serve.serving.manifest import Manifest
    from d3qe_serve.serving.server import served

    info = machine("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, served(args.url, args.repo) as (url, _):
        elapsed, clip = _timed(
            f"encoding a {args.seconds:g} s 720p clip",
            lambda: make_clip(Path(tmp) / "clip.mp4", args.seconds, args.rate),
        )
        source_frames = round(args.seconds * args.rate)
        print(f"  {source_frames / elapsed:.1f} frames/s encoded", file=sys.stderr)

        client = D3QEClient(url, VIDEO_MODEL, batch_size=args.batch_size, concurrency=args.concurrency)
        model = client.wait_until_ready(600)
        rows += decode_then_score(clip, client, args.fps, source_frames)
        if args.every_frame:
            every, count = _timed("decoding every frame", lambda: sum(1 for _ in decode_frames(clip, fps=None)))
            rows.append({"stage": "decode every frame", "frames": count, "seconds": every})
        seconds, result = _timed("end to end", lambda: score_video(clip, client, fps=args.fps))
        rows.append({"stage": f"end to end @{args.fps:g} fps", "frames": len(result.frames), "seconds": seconds})
        client.close()
    for r in rows:
        r["frames_per_s"] = r["frames"] / r["seconds"]
    served_model = {"name": model.name, "platform": model.platform, "max_batch_size": model.max_batch_size}
    if not args.url:
        manifest = Manifest.read(args.repo)
        served_model.update(
            runtime=manifest.runtime,
            precision=manifest.precision,
            checkpoint=manifest.checkpoint,
            seeded_weights=manifest.seeded_weights,
        )
    report = {
        **report_header(f"D³QE on video, {args.seconds:g} s 1280×720 H.264 @{args.rate} fps", info),
        "served": served_model,
        "repository": None if args.url else str(args.repo),
        "settings": {
            "seconds": args.seconds,
            "rate": args.rate,
            "fps": args.fps,
            "batch_size": args.batch_size,
            "concurrency": args.concurrency,
        },
        "rows": rows,
    }
    out_dir = results_dir(info, args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "video.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(out_dir / "video.png", rows, report["title"])
    for r in rows:
        print(f"{r['stage']:24} {r['frames']:6} frames in {r['seconds']:7.2f} s: {r['frames_per_s']:8.1f} frames/s")
    print(f"wrote {out_dir}/video.json, video.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
