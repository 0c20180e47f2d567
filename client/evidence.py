"""The evidence behind one image's score, from the server's `d3qe_evidence` ensemble: what a reviewer looks at.

Per token of the model's 16×16 grid: the magnitude of the quantization error |z_q − z| (the trace D³QE
reads) and the D³AT attention the token receives. Per code the image uses: how many of its tokens use
it, beside that code's share of the real and of the fake training tokens (the checkpoint's codebook
counts) — generated images concentrate on fewer codes, and on codes more common among fake tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from d3qe_serve.client.results import ScoreResult, provenance
from d3qe_serve.contract import (
    ATTENTION,
    ERROR_MAP,
    EVIDENCE_ENTRANCE,
    FAKE_FREQ,
    INDICES,
    LOGIT,
    MANIFEST_ID,
    PROB,
    PROVENANCE,
    REAL_FREQ,
    THRESHOLD,
    entrance,
)
from d3qe_serve.errors import EvidenceError


@dataclass(frozen=True)
class CodeUsage:
    code: int
    tokens: int  # how many of the image's tokens use this code
    real_freq: float  # the code's share of the real training tokens
    fake_freq: float  # and of the fake ones


@dataclass(frozen=True)
class Evidence:
    result: ScoreResult
    error_map: np.ndarray  # [16, 16] float32: |z_q − z| per token
    attention: np.ndarray  # [16, 16] float32: D³AT attention received, mean over layers, heads, queries
    indices: np.ndarray  # [256] int64: each token's code, row-major over the grid
    real_freq: np.ndarray  # [256] float32: each token's code's share of the real training tokens
    fake_freq: np.ndarray  # [256] float32: and of the fake ones

    def codebook_usage(self) -> list[CodeUsage]:
        """The codes the image uses, most used first (ties: lower code first)."""
        codes, first, counts = np.unique(self.indices, return_index=True, return_counts=True)
        order = np.lexsort((codes, -counts))
        return [
            CodeUsage(int(codes[i]), int(counts[i]), float(self.real_freq[first[i]]), float(self.fake_freq[first[i]]))
            for i in order
        ]

    def fake_leaning_share(self) -> float:
        """The share of the image's tokens whose code is more frequent among fake than among real tokens."""
        return float(np.mean(self.fake_freq > self.real_freq))

    def as_dict(self) -> dict:
        """JSON-ready: the score, both maps as nested lists, the per-code usage and its summary."""
        usage = self.codebook_usage()
        return {
            **self.result.as_dict(),
            "grid": list(self.error_map.shape),
            "error_map": self.error_map.tolist(),
            "attention": self.attention.tolist(),
            "codes_used": len(usage),
            "tokens": int(self.indices.size),
            "fake_leaning_share": self.fake_leaning_share(),
            "codebook_usage": [u.__dict__ for u in usage],
        }


def fetch_evidence(
    grpc: grpcclient.InferenceServerClient,
    source: str,
    image: bytes,
    model: str = EVIDENCE_ENTRANCE,
    threshold: float | None = None,
) -> Evidence:
    """One encoded image through `model`; raises EvidenceError with the server's reason when it fails.
    `threshold`: the verdict's (None: the one the server answers with)."""
    signature = entrance(EVIDENCE_ENTRANCE)
    spec = signature.input
    tensor = grpcclient.InferInput(spec.name, [1, *spec.dims], spec.triton_dtype)
    tensor.set_data_from_numpy(np.array([[image]], dtype=spec.dtype))
    names = [n for n in signature.output_names if n not in PROVENANCE]  # all answered anyway where served
    try:
        answer = grpc.infer(model, [tensor])
    except InferenceServerException as e:
        raise EvidenceError(f"{source}: {e.message()}") from e
    out = {n: answer.as_numpy(n) for n in names}
    missing = [n for n, v in out.items() if v is None]
    if missing:
        raise EvidenceError(f"{source}: model {model!r} returned no {', '.join(missing)}")
    (manifest_id,), (served,) = provenance(answer.as_numpy(MANIFEST_ID), answer.as_numpy(THRESHOLD), 1)
    return Evidence(
        ScoreResult.from_scores(
            source,
            float(out[LOGIT].item()),
            float(out[PROB].item()),
            served if threshold is None else threshold,
            manifest_id,
        ),
        error_map=out[ERROR_MAP][0],
        attention=out[ATTENTION][0],
        indices=out[INDICES][0],
        real_freq=out[REAL_FREQ][0],
        fake_freq=out[FAKE_FREQ][0],
    )
