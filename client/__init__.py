"""The client of a served D³QE: no torch, no model code.

The public API is what `__all__` lists; each name is imported from its module when first used, so that
`import d3qe_serve.client` (and every module under it) costs nothing and needs no optional extra:
`score_video` needs the `video` extra (PyAV) only when called.

- `D3QEClient`, `AsyncD3QEClient`: score images (paths, bytes, RGB arrays) over gRPC, in input order,
  each failure in its slot (`ScoreResult.error`); `RetryPolicy` for a server that is not up yet.
- `D3QEReward`, `AsyncD3QEReward`: a detector reward for generated image batches (RL training).
- `score_video`, `VideoResult`, `FrameScore`, `SpanRule`: a video's sampled frames scored into a timeline.
- `Evidence`, `CodeUsage`: what lies behind one image's score (the review page's maps).
- `ScoreResult`: one image's logit, probability and verdict, or its error.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from d3qe_serve.client.evidence import CodeUsage, Evidence
    from d3qe_serve.client.grpc_client import AsyncD3QEClient, D3QEClient, RetryPolicy
    from d3qe_serve.client.results import ScoreResult
    from d3qe_serve.client.reward import AsyncD3QEReward, D3QEReward
    from d3qe_serve.client.video import FrameScore, SpanRule, VideoResult, score_video

_HOMES = {
    "D3QEClient": "grpc_client",
    "AsyncD3QEClient": "grpc_client",
    "RetryPolicy": "grpc_client",
    "D3QEReward": "reward",
    "AsyncD3QEReward": "reward",
    "score_video": "video",
    "VideoResult": "video",
    "FrameScore": "video",
    "SpanRule": "video",
    "Evidence": "evidence",
    "CodeUsage": "evidence",
    "ScoreResult": "results",
}
__all__ = [
    "AsyncD3QEClient",
    "AsyncD3QEReward",
    "CodeUsage",
    "D3QEClient",
    "D3QEReward",
    "Evidence",
    "FrameScore",
    "RetryPolicy",
    "ScoreResult",
    "SpanRule",
    "VideoResult",
    "score_video",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
