"""D³QE as an RL reward, against a real Triton server serving the fixture checkpoint (`d3qe_rgb` entrance)."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from d3qe_serve.client.grpc_client import D3QEClient
from d3qe_serve.client.reward import AsyncD3QEReward, D3QEReward, rgb_images
from tests.helpers import LOGIT_TOL

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def decoded(fixture_images) -> list[np.ndarray]:
    """The fixture images' pixels as a decoder gives them (what a trainer holds), each its own size."""
    return [np.asarray(Image.open(p).convert("RGB")) for p in fixture_images]


@pytest.fixture(scope="module")
def reward(tiny_server):
    with D3QEReward(tiny_server.endpoints.grpc_url, chunk_size=3) as r:
        r.wait_until_ready()
        yield r


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    """Four generated-looking images of one size, uint8 NHWC."""
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((320, 240)))
    return np.stack([np.roll(smooth, 37 * k, axis=1) for k in range(4)]).astype(np.uint8)


def test_raw_pixels_score_as_the_fixture_and_as_png_bytes(reward, decoded, expected, tiny_server):
    scores, info = reward(decoded)
    np.testing.assert_allclose(info["logit"], expected["image_logits_reference"][:, 0], rtol=0, atol=LOGIT_TOL)
    np.testing.assert_allclose(scores, 1 - info["p_generated"], rtol=0, atol=1e-7)
    assert scores.dtype == np.float32 and info["error"] == [None] * len(decoded)
    pngs = []
    for rgb in decoded:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    with D3QEClient(tiny_server.endpoints.grpc_url) as client:
        from_png = [r.logit for r in client.score((str(i), b) for i, b in enumerate(pngs))]
    np.testing.assert_allclose(info["logit"], from_png, rtol=0, atol=1e-6)  # the same pixels, the same score


def test_every_layout_gives_the_same_scores(reward, batch, tiny_server):
    want, _ = reward(batch)
    floats = batch.astype(np.float32) / 255
    layouts = {
        "torch NCHW float": torch.from_numpy(floats).permute(0, 3, 1, 2),
        "torch NHWC uint8": torch.from_numpy(batch),
        "torch NCHW bfloat16": torch.from_numpy(floats).permute(0, 3, 1, 2).to(torch.bfloat16),
        "numpy NCHW float64": floats.transpose(0, 3, 1, 2).astype(np.float64),
        "list of PIL": [Image.fromarray(a) for a in batch],
        "list of CHW tensors": [torch.from_numpy(a).permute(2, 0, 1) for a in batch],
    }
    for name, images in layouts.items():
        got, _ = reward(images)
        tol = 2e-2 if "bfloat16" in name else 0  # bf16 holds 8 bits of mantissa: pixels move by one level
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=name)
    with D3QEReward(tiny_server.endpoints.grpc_url, score="neg_logit", shared_memory=True) as shm_reward:
        neg, info = shm_reward(batch)
    np.testing.assert_allclose(neg, -info["logit"], rtol=0, atol=0)
    np.testing.assert_allclose(1 / (1 + np.exp(neg)), 1 - want, rtol=0, atol=1e-6)


def test_concurrent_calls_from_eight_threads_keep_order(reward, batch, decoded):
    calls = [batch[k:] for k in range(4)] + [decoded[k:] for k in range(4)]
    alone = [reward(c)[0] for c in calls]
    got: dict[int, np.ndarray] = {}

    def call(k: int) -> None:
        got[k] = reward(calls[k])[0]

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for k, want in enumerate(alone):
        np.testing.assert_allclose(got[k], want, rtol=0, atol=1e-6)


def test_bad_images_fail_alone(reward, decoded):
    nan = decoded[0].astype(np.float32) / 255
    nan[5, 5, 1] = np.nan
    images = [
        decoded[0],
        nan,
        decoded[1][:8, :8],  # below the model's minimum side: refused by the server
        decoded[2].astype(np.float32),  # 0-255 floats: out of [0, 1]
        np.zeros((32, 32, 4), np.uint8),
        decoded[3].astype(np.int32),
        decoded[3],
    ]
    scores, info = reward(images)
    assert np.isfinite(scores[[0, 6]]).all() and np.isnan(scores[1:6]).all()
    errors = info["error"]
    assert errors[0] is None and errors[6] is None
    assert "image 1: pixels contain NaN" in errors[1]
    assert "image 2:" in errors[2] and "below the minimum of 16 pixels" in errors[2]
    assert "image 3: float pixels must lie in [0, 1], got values in [0, 255]" in errors[3]
    assert "image 4: an image needs 3 colour channels" in errors[4]
    assert "image 5: pixels must be uint8 (0-255) or float in [0, 1], got int32" in errors[5]
    alone, _ = reward([decoded[0], decoded[3]])
    np.testing.assert_allclose(scores[[0, 6]], alone, rtol=0, atol=1e-6)


def test_a_batch_that_is_not_images_is_refused():
    with pytest.raises(ValueError, match="4 axes"):
        rgb_images(np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(TypeError, match="got str"):
        rgb_images("not an image")
    (bad,) = rgb_images(["not an image"])  # in a list: that image alone
    assert "image 0: expected a torch tensor, a numpy array or a PIL image, got str" in bad.error


def test_the_server_refuses_wrong_tensors_by_name(tiny_server):
    with grpcclient.InferenceServerClient(tiny_server.endpoints.grpc_url) as c:
        floats = grpcclient.InferInput("RGB", [1, 32, 32, 3], "FP32")
        floats.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.float32))
        with pytest.raises(InferenceServerException, match="RGB.*UINT8|datatype"):
            c.infer("d3qe_rgb", [floats])
        channels = grpcclient.InferInput("RGB", [1, 32, 32, 4], "UINT8")
        channels.set_data_from_numpy(np.zeros((1, 32, 32, 4), np.uint8))
        with pytest.raises(InferenceServerException, match="shape|dims"):
            c.infer("d3qe_rgb", [channels])


def test_the_asyncio_twin_gives_the_same_scores(reward, decoded, tiny_server):
    want, _ = reward(decoded)

    async def run() -> np.ndarray:
        async with AsyncD3QEReward(tiny_server.endpoints.grpc_url) as r:
            return (await r(decoded))[0]

    np.testing.assert_allclose(asyncio.run(run()), want, rtol=0, atol=1e-6)
