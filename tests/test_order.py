"""Every runtime gives one result per item in input order, each failure in its own slot, and all agree.

The same mixed input (the fixture images with bad ones between them, inside batches where good images
still wait) goes through the eager model in this process, the tiny export's parts in this process and the
served client against a real tiny server: the same sources in the same order, the same items failing with
the same error (the served one carries the in-process message: the server preprocesses with the same
`d3qe.preprocess`), and the fixture's logits. Once as encoded files (`d3qe`), once as decoded pixels
(`d3qe_rgb`).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from d3qe_serve.client.grpc_client import D3QEClient
from d3qe_serve.client.results import Item, ScoreResult
from d3qe_serve.client.video import score_video
from d3qe_serve.serving.inprocess import WeightOptions, open_eager, open_exported
from tests.helpers import LOGIT_TOL, png_header_only

BATCH = 4  # each bad item lands inside a batch, after good ones still waiting for their forward pass
ENTRANCE = {"encoded": "d3qe", "pixels": "d3qe_rgb"}
# The problem each bad item's error names, whichever runtime scores it.
PROBLEM = {
    "corrupt": "not a decodable image",
    "too_small": "below the minimum of 16 pixels per side",
    "bomb": "decompression bomb",
    "too_elongated": "aspect ratio too extreme",
    "empty": "empty image",
    "truncated": "truncated or corrupt",
    "float_pixels": "RGB pixels must be uint8",
}


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _interleave(good: list[Item], bad: list[Item]) -> list[Item]:
    """good, bad, good, bad, …, then the remaining good ones."""
    mixed = [x for pair in zip(good, bad, strict=False) for x in pair]
    return mixed + good[len(bad) :]


@pytest.fixture(scope="module")
def inputs(fixture_images) -> dict[str, list[Item]]:
    jpeg = next(p for p in fixture_images if p.suffix == ".jpg").read_bytes()
    encoded_bad = [
        ("corrupt", b"\x89PNG\r\n\x1a\n not really"),
        ("too_small", _png(np.zeros((8, 8, 3), np.uint8))),
        ("bomb", png_header_only(20000, 20000)),
        ("too_elongated", png_header_only(16, 20000)),
        ("empty", b""),
        ("truncated", jpeg[: len(jpeg) // 2]),
    ]
    # 16 × 12300: its resize to a 256 short side would exceed the pixel limit
    pixels_bad = [
        ("too_small", np.zeros((8, 8, 3), np.uint8)),
        ("too_elongated", np.zeros((16, 12300, 3), np.uint8)),
        ("float_pixels", np.zeros((64, 64, 3), np.float32)),
    ]
    return {
        "encoded": _interleave([(p.name, p.read_bytes()) for p in fixture_images], encoded_bad),
        "pixels": _interleave([(p.name, np.asarray(Image.open(p).convert("RGB"))) for p in fixture_images], pixels_bad),
    }


@pytest.fixture(scope="module")
def eager_scorer(tiny_checkpoint):
    return open_eager(WeightOptions(tiny_checkpoint), batch_size=BATCH)


@pytest.fixture(scope="module")
def eager_results(eager_scorer, inputs) -> dict[str, list[ScoreResult]]:
    return {kind: list(eager_scorer(items)) for kind, items in inputs.items()}


def check(results: list[ScoreResult], items: list[Item], expected) -> None:
    """One result per item in input order; good ones carry the fixture's logits, bad ones fail naming the problem."""
    want = dict(zip(map(str, expected["image_names"]), expected["image_logits_reference"][:, 0], strict=True))
    assert [r.source for r in results] == [s for s, _ in items]
    for r in results:
        if r.source in want:
            assert r.ok, (r.source, r.error)
            assert abs(r.logit - want[r.source]) < LOGIT_TOL, r.source
            assert abs(r.probability - 1 / (1 + np.exp(-r.logit))) < 1e-5, r.source
            assert r.verdict == ("generated" if r.probability > 0.5 else "real")
        else:
            assert not r.ok and r.logit is None and r.probability is None and r.verdict is None
            assert PROBLEM[r.source] in r.error, (r.source, r.error)


def same_as_eager(results: list[ScoreResult], eager: list[ScoreResult]) -> None:
    for r, e in zip(results, eager, strict=True):
        assert r.source == e.source and r.ok == e.ok
        if e.ok:
            assert abs(r.logit - e.logit) < LOGIT_TOL, r.source
            assert r.verdict == e.verdict
        else:
            assert e.error in r.error, (r.source, r.error, e.error)


@pytest.mark.parametrize("kind", ENTRANCE)
def test_eager_keeps_each_result_in_its_slot(eager_results, inputs, expected, kind):
    check(eager_results[kind], inputs[kind], expected)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ENTRANCE)
def test_exported_in_process_gives_the_same_results(tiny_repository, eager_results, inputs, expected, kind):
    results = list(open_exported(tiny_repository, batch_size=BATCH)(inputs[kind]))
    check(results, inputs[kind], expected)
    same_as_eager(results, eager_results[kind])


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("kind", ENTRANCE)
def test_the_served_client_gives_the_same_results(tiny_server, eager_results, inputs, expected, kind):
    with D3QEClient(tiny_server.endpoints.grpc_url, ENTRANCE[kind], batch_size=BATCH, concurrency=2) as client:
        client.wait_until_ready(timeout=30)
        results = list(client.score(inputs[kind]))
    check(results, inputs[kind], expected)
    same_as_eager(results, eager_results[kind])


def test_a_failed_frame_leaves_its_neighbours_their_times(eager_scorer, inputs, expected):
    """In-process, a video's frames keep their times around a frame that fails (here: one too small)."""
    pixels = inputs["pixels"]
    frames = [(0.5 * i, image) for i, (_, image) in enumerate(pixels)]
    result = score_video(frames, eager_scorer, every_frame=True, progress=False)
    assert [f.time_s for f in result.frames] == [t for t, _ in frames]
    want = dict(zip(map(str, expected["image_names"]), expected["image_logits_reference"][:, 0], strict=True))
    for frame, (source, _) in zip(result.frames, pixels, strict=True):
        if source in want:
            assert frame.error is None and abs(frame.logit - want[source]) < LOGIT_TOL, source
        else:
            assert frame.logit is None and PROBLEM[source] in frame.error, source
