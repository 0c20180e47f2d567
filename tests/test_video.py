"""Videos: lossless test videos made here with PyAV, decoded, scored through a real Triton server (`d3qe_rgb`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from d3qe_serve.cli.main import main
from d3qe_serve.client.grpc_client import D3QEClient
from d3qe_serve.client.video import SpanRule, VideoError, decode_frames, fake_periods, score_video, top_mean
from d3qe_serve.errors import MissingDependencyError
from tests.helpers import LOGIT_TOL, write_video

av = pytest.importorskip("av")

RATE = 4  # frames per second of the test videos
SIZE = 256
server = [pytest.mark.server, pytest.mark.slow]


def write_audio_only(path: Path) -> Path:
    """One second of silence, PCM in Matroska: a file with no video stream."""
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def corrupted(video: bytes) -> bytes:
    """`video` with 4 KiB of seeded garbage in its middle."""
    mid = len(video) // 2
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return video[:mid] + garbage + video[mid + 4096 :]


@pytest.fixture(scope="module")
def frames(fixture_images) -> list[np.ndarray]:
    """The fixture images cropped and resized to 256×256 RGB, one video frame each."""
    return [np.asarray(ImageOps.fit(Image.open(p).convert("RGB"), (SIZE, SIZE))) for p in fixture_images]


@pytest.fixture(scope="module")
def client(tiny_server):
    with D3QEClient(tiny_server.endpoints.grpc_url, "d3qe_rgb", batch_size=4) as c:
        c.wait_until_ready()
        yield c


@pytest.fixture(scope="module")
def alone(tiny_server, frames) -> list[float]:
    """Each frame's logit, sent alone (one request each)."""
    with D3QEClient(tiny_server.endpoints.grpc_url, "d3qe_rgb", batch_size=1) as c:
        return [r.logit for r in c.score((str(i), f) for i, f in enumerate(frames))]


def test_decoding_is_lossless_and_samples_at_fps(frames, tmp_path):
    path = write_video(tmp_path / "clip.mkv", frames, RATE)
    decoded = list(decode_frames(path, fps=None))
    assert [t for t, _ in decoded] == [i / RATE for i in range(len(frames))]
    for want, (_, got) in zip(frames, decoded, strict=True):
        assert got.dtype == np.uint8 and np.array_equal(got, want)  # the codec is truly lossless
    sampled = list(decode_frames(path, fps=2.0))  # every other frame of a 4 fps video
    assert [t for t, _ in sampled] == [i / 2 for i in range(math.ceil(len(frames) / 2))]
    assert all(np.array_equal(got, frames[2 * i]) for i, (_, got) in enumerate(sampled))
    assert len(frames) == 7 and [t for t, _ in decode_frames(path, fps=1.5)] == [0.0, 0.75, 1.5]  # ticks 0, ⅔, 1⅓


def test_fake_periods_land_where_the_high_frames_are():
    times = [i / 2 for i in range(30)]  # 2 fps
    probs = [0.05] * 30
    probs[6:12] = [0.95] * 6  # 3.0 s … 5.5 s
    probs[20:30] = [0.9, 0.9, 0.5, 0.9, 0.9, 0.95, 0.9, 0.9, 0.9, 0.9]  # a dip inside, then to the end
    assert fake_periods(times, probs) == [[3.0, 6.0, 0.95], [10.0, 15.0, 0.95]]
    assert fake_periods(times, probs, window=1, high=0.6, low=0.55) == [
        [3.0, 6.0, 0.95],
        [10.0, 11.0, 0.9],
        [11.5, 15.0, 0.95],
    ]
    assert fake_periods(times, probs, min_duration=3.5) == [[10.0, 15.0, 0.95]]
    probs[15] = 0.99  # one frame: smoothed to 0.36, no span; unsmoothed, a span of one sample interval
    assert fake_periods(times, probs) == [[3.0, 6.0, 0.95], [10.0, 15.0, 0.95]]
    assert fake_periods(times, probs, window=1, min_duration=0.5) == [
        [3.0, 6.0, 0.95],
        [7.5, 8.0, 0.99],
        [10.0, 15.0, 0.95],
    ]
    assert fake_periods([], []) == []
    with pytest.raises(ValueError, match="odd"):
        fake_periods(times, probs, window=2)
    assert top_mean(np.array([0.1] * 18 + [0.9, 0.7])) == pytest.approx(0.8)  # k = ceil(10 % of 20) = 2


def test_bad_videos_raise_naming_the_file_and_the_problem(frames, tmp_path):
    good = write_video(tmp_path / "good.mkv", frames, RATE).read_bytes()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video\n")
    (tmp_path / "truncated.mkv").write_bytes(good[: len(good) // 2])
    (tmp_path / "corrupt.mkv").write_bytes(corrupted(good))
    write_audio_only(tmp_path / "audio.mkv")
    write_video(tmp_path / "tiny.mkv", [np.zeros((8, 32, 3), np.uint8)] * 2, RATE)
    problems = {
        "missing.mp4": "no such file",
        "empty.mp4": "empty file",
        "text.mp4": "not a decodable video",
        "truncated.mkv": "corrupt or truncated video",
        "corrupt.mkv": "corrupt or truncated video",
        "audio.mkv": "no video stream",
        "tiny.mkv": "below the minimum of 16",
    }
    for name, problem in problems.items():
        with pytest.raises(VideoError, match=problem) as e:
            list(decode_frames(tmp_path / name))
        assert str(tmp_path / name) in str(e.value)
    with pytest.raises(VideoError, match="frames"):
        list(decode_frames(tmp_path / "good.mkv", fps=None, max_frames=3))


def test_without_pyav_decoding_names_the_extra(frames, tmp_path, monkeypatch):
    path = write_video(tmp_path / "clip.mkv", frames[:2], RATE)
    monkeypatch.setitem(sys.modules, "av", None)  # not installed, as far as an import can tell
    with pytest.raises(MissingDependencyError, match=r"PyAV: pip install 'd3qe-serve\[video\]'"):
        next(decode_frames(path))


@pytest.mark.server
@pytest.mark.slow
def test_each_frame_scores_as_the_image_alone(client, alone, frames, tmp_path):
    path = write_video(tmp_path / "clip.mkv", frames, RATE)
    result = score_video(path, client, every_frame=True, progress=False)
    assert [f.time_s for f in result.frames] == [i / RATE for i in range(len(frames))]
    np.testing.assert_allclose([f.logit for f in result.frames], alone, rtol=0, atol=1e-5)
    probs = np.array([f.p_generated for f in result.frames])
    assert result.p_mean == pytest.approx(probs.mean()) and result.p_topk == pytest.approx(probs.max())
    assert result.verdict == ("generated" if probs.max() > 0.5 else "real") and result.ok

    in_memory = score_video([(i / RATE, f) for i, f in enumerate(frames)], client, fps=2.0, progress=False)
    assert [f.time_s for f in in_memory.frames] == [i / 2 for i in range(math.ceil(len(frames) / 2))]
    np.testing.assert_allclose([f.logit for f in in_memory.frames], alone[::2], rtol=0, atol=1e-5)


@pytest.mark.server
@pytest.mark.slow
def test_a_folder_scores_videos_beside_images_and_bad_videos_fail_alone(
    tiny_server, alone, frames, fixture_images, tmp_path, capsys
):
    # Frames of the lowest- and the highest-scoring image: 3 s low, 2 s high, 2 s low at 4 fps, sampled at 2.
    low, high = int(np.argmin(alone)), int(np.argmax(alone))
    sequence = [frames[low]] * 12 + [frames[high]] * 8 + [frames[low]] * 8
    folder = tmp_path / "in"
    folder.mkdir()
    good = write_video(folder / "spliced.mkv", sequence, RATE).read_bytes()
    (folder / "truncated.mkv").write_bytes(good[: len(good) // 2])
    (folder / "corrupt.mkv").write_bytes(corrupted(good))
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("not a video\n")
    write_audio_only(folder / "audio.mkv")
    Image.fromarray(frames[0]).save(folder / "still.png")

    p = [1 / (1 + math.exp(-alone[i])) for i in (low, high)]
    threshold = sum(p) / 2  # the tiny model's scores are close together: spans between its two levels
    url = tiny_server.endpoints.grpc_url
    plots = tmp_path / "plots"
    code = main(["score", str(folder), "--url", url, "--json", "--plot", str(plots)])
    rows = {Path(r["source"]).name: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert code == 1
    assert abs(rows["still.png"]["logit"] - alone[0]) < 1e-5  # the image row, as before
    for name, problem in {
        "truncated.mkv": "corrupt or truncated video",
        "corrupt.mkv": "corrupt or truncated video",
        "empty.mp4": "empty file",
        "text.mp4": "not a decodable video",
        "audio.mkv": "no video stream",
    }.items():
        assert problem in rows[name]["error"] and rows[name]["frames"] == []
    video = rows["spliced.mkv"]
    assert video["error"] is None and video["fps"] == 2.0 and len(video["frames"]) == 14
    assert [f["time_s"] for f in video["frames"]] == [i / 2 for i in range(14)]
    assert video["interval_s"] == 0.5
    assert sorted(plots.iterdir()) == [plots / "spliced.mkv.png"]
    assert Image.open(plots / "spliced.mkv.png").format == "PNG"

    # The same scores through the API, with hysteresis between the two levels: the span is the high frames'.
    times = [f["time_s"] for f in video["frames"]]
    probs = [f["p_generated"] for f in video["frames"]]
    assert fake_periods(times, probs, high=threshold, low=threshold) == [[3.0, 5.0, pytest.approx(p[1], abs=1e-5)]]
    with D3QEClient(url, "d3qe_rgb") as c:
        api = score_video(folder / "spliced.mkv", c, spans=SpanRule(high=threshold, low=threshold), progress=False)
    assert [period[:2] for period in api.fake_periods] == [[3.0, 5.0]]


@pytest.mark.server
@pytest.mark.slow
def test_score_runs_videos_in_process_with_runtime_eager(alone, frames, tiny_checkpoint, tmp_path, capsys):
    path = write_video(tmp_path / "clip.mkv", frames, RATE)
    args = ["score", str(path), "--runtime", "eager", "--checkpoint", str(tiny_checkpoint), "--every-frame"]
    assert main([*args, "--json"]) == 0
    video = json.loads(capsys.readouterr().out)
    assert video["fps"] is None and video["interval_s"] == 1 / RATE
    np.testing.assert_allclose([f["logit"] for f in video["frames"]], alone, rtol=0, atol=LOGIT_TOL)
    assert main(args) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"{path}\tvideo, {len(frames)} frames\tp_mean=") and "fake periods:" in line


def test_the_frame_limits_are_the_models():
    """client.video restates d3qe.preprocess's limits (importing them would import torch): they must agree."""
    from d3qe_serve.client import video
    from d3qe_serve.d3qe.preprocess import MAX_PIXELS, MIN_SIDE

    assert (video.MAX_PIXELS, video.MIN_SIDE) == (MAX_PIXELS, MIN_SIDE)
