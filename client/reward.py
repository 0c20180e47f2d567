"""D³QE as a reward for RL fine-tuning of image generators (flow_grpo / TRL DDPO convention).

    reward = D3QEReward("localhost:8001")            # the server's `d3qe_rgb` entrance
    scores, info = reward(images, prompts, metadata)  # scores: float32 [N], in input order

`images` are what a trainer holds: a torch tensor (CPU or CUDA; float in [0, 1] or uint8; NCHW or NHWC),
a numpy array of the same kinds, or a list of PIL images, arrays or tensors (one image each, any sizes).
They are sent as decoded uint8 RGB pixels, never re-encoded: JPEG would change exactly the traces D³QE
reads. Float pixels become uint8 as an image saved to a file would (`round(x · 255)`, as diffusers'
`numpy_to_pil` does), so the reward of a float image equals the score of that image saved as PNG.

The reward is `1 − P(generated)` by default (`score="real"`: high when the detector calls the image
real) or `−logit` (`score="neg_logit"`). `info` holds per image `logit`, `p_generated`, `verdict` and
`error`: an image that cannot be scored (NaN or out-of-range pixels, too small, wrong channels) gets
reward NaN and its error, and the rest of the call is scored. Combining with other rewards — weights,
per-prompt-group normalisation — is the trainer's (see docs/reward.md).

Thread-safe: one `D3QEReward` may be called from many threads at once (each call keeps `concurrency`
requests in flight; UNAVAILABLE refusals are retried with backoff). `AsyncD3QEReward` is the asyncio
twin. `shared_memory=True` passes pixels through system shared memory when trainer and server share a
host (the server must allow it: `d3qe serve --shared-memory`). Imports no torch: tensors are read
through their own `.detach().cpu()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from d3qe_serve.client.grpc_client import DEFAULT_URL, AsyncD3QEClient, D3QEClient, RetryPolicy
from d3qe_serve.client.results import ScoreResult
from d3qe_serve.contract import RGB_ENTRANCE
from d3qe_serve.errors import InputError

SCORES = ("real", "neg_logit")


@dataclass(frozen=True)
class _Bad:
    """An image that cannot be sent, and why."""

    error: str


def _numpy(x: Any) -> np.ndarray:
    """A numpy array, a torch tensor (any device; half precision widened first) or a PIL image as numpy."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "is_floating_point"):  # torch, without importing it
        t = x.detach()
        return (t.float() if t.is_floating_point() else t).cpu().numpy()
    if hasattr(x, "convert") and hasattr(x, "size"):  # a PIL image: its pixels, as decoding a file gives them
        return np.asarray(x.convert("RGB"))
    raise TypeError(f"expected a torch tensor, a numpy array or a PIL image, got {type(x).__name__}")


def _hwc(a: np.ndarray) -> np.ndarray:
    """One image [H, W, 3] or [3, H, W] → [H, W, 3]."""
    if a.ndim != 3:
        raise ValueError(f"an image needs 3 axes ([H, W, 3] or [3, H, W]), got shape {list(a.shape)}")
    if a.shape[2] == 3:
        return a
    if a.shape[0] == 3:
        return a.transpose(1, 2, 0)
    raise ValueError(f"an image needs 3 colour channels, got shape {list(a.shape)}")


def _uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"pixels must be uint8 (0-255) or float in [0, 1], got {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError("pixels contain NaN or infinity")
    low, high = float(a.min()), float(a.max())
    if low < 0 or high > 1:
        raise ValueError(f"float pixels must lie in [0, 1], got values in [{low:g}, {high:g}]")
    return np.ascontiguousarray(np.rint(a * 255).astype(np.uint8))


def rgb_images(images: Any) -> list[np.ndarray | _Bad]:
    """The call's images as uint8 [H, W, 3] arrays, one per image; an image that cannot be converted is `_Bad`."""
    if isinstance(images, Sequence) and not isinstance(images, str | bytes):
        items = list(images)
    else:
        batch = _numpy(images)
        if batch.ndim != 4:
            raise InputError(f"a batch of images needs 4 axes (NCHW or NHWC), got shape {list(batch.shape)}")
        items = list(batch)
    out: list[np.ndarray | _Bad] = []
    for i, item in enumerate(items):
        try:
            out.append(_uint8(_hwc(_numpy(item))))
        except (TypeError, ValueError) as e:
            out.append(_Bad(f"image {i}: {e}"))
    return out


class _RewardBase:
    """The options and the bookkeeping both rewards share; the client (sync or asyncio) is the subclass's."""

    _client_type: type[D3QEClient] | type[AsyncD3QEClient]

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        score: str = "real",
        model: str = RGB_ENTRANCE,  # decoded pixels, sent as they are
        chunk_size: int = 8,
        concurrency: int = 4,
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
        shared_memory: bool = False,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.score = score
        self.client = self._client_type(
            url,
            model,
            batch_size=chunk_size,
            concurrency=concurrency,
            timeout=timeout,
            retry=retry,
            shared_memory=shared_memory,
        )

    def _items(self, images: Any) -> tuple[list[np.ndarray | _Bad], list[tuple[str, np.ndarray]]]:
        converted = rgb_images(images)
        return converted, [(f"image {i}", a) for i, a in enumerate(converted) if isinstance(a, np.ndarray)]

    def _result(self, converted: list[np.ndarray | _Bad], results: list[ScoreResult]) -> tuple[np.ndarray, dict]:
        """Scores and `info` of every image: `results` are those of the images sent, in input order."""
        sent = iter(results)
        n = len(converted)
        logit = np.full(n, np.nan, dtype=np.float32)
        p_generated = np.full(n, np.nan, dtype=np.float32)
        verdict: list[str | None] = [None] * n
        error: list[str | None] = [None] * n
        for i, image in enumerate(converted):
            if isinstance(image, _Bad):
                error[i] = image.error
            elif (r := next(sent)).ok:
                logit[i], p_generated[i], verdict[i] = r.logit, r.probability, r.verdict
            else:
                error[i] = f"image {i}: {r.error}"
        scores = (1 - p_generated) if self.score == "real" else -logit
        info = {"logit": logit, "p_generated": p_generated, "verdict": verdict, "error": error}
        return scores.astype(np.float32), info


class D3QEReward(_RewardBase):
    """`reward(images, prompts=None, metadata=None) -> (scores, info)` through a Triton server's `d3qe_rgb`.

    `chunk_size`: images per request (the server's max batch caps it); `concurrency`: requests in flight
    per call; `timeout`: seconds per request.
    """

    _client_type = D3QEClient

    def __call__(self, images: Any, prompts: Any = None, metadata: Any = None) -> tuple[np.ndarray, dict]:
        """Scores float32 [N] in input order (NaN where an image failed) and per-image `info`; prompts and
        metadata are accepted for the trainer's convention and not used (D³QE looks at pixels only)."""
        converted, items = self._items(images)
        return self._result(converted, list(self.client.score(items)))

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        self.client.wait_until_ready(timeout)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> D3QEReward:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncD3QEReward(_RewardBase):
    """The asyncio twin: `await reward(images, prompts, metadata)`."""

    _client_type = AsyncD3QEClient

    async def __call__(self, images: Any, prompts: Any = None, metadata: Any = None) -> tuple[np.ndarray, dict]:
        converted, items = self._items(images)
        return self._result(converted, [r async for r in self.client.score(items)])

    async def wait_until_ready(self, timeout: float = 60.0) -> None:
        await self.client.wait_until_ready(timeout)

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> AsyncD3QEReward:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
