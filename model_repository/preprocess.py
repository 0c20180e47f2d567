"""Triton python-backend model `preprocess`: IMAGE (encoded image bytes) → PIXELS float32 [3, 256, 256].

`serving.repository.write_repository` copies this file to `<repository>/preprocess/1/model.py`.
PIXELS is upstream's eval transform (`d3qe.preprocess`). Each request is answered on its own: an
empty, undecodable, truncated, too small or oversized image (`d3qe.preprocess` limits: MIN_SIDE,
MAX_PIXELS, MAX_IMAGE_BYTES) gets an error response naming the problem, INVALID_ARG with a message
starting "IMAGE: " or "IMAGE[i]: " (how the gate in front of the ensemble tells a client's mistake), and
the other requests of the same dynamic batch are answered normally. The bytes are only ever decoded:
a request that spells a file path is an undecodable image, never a file to open.
"""

from __future__ import annotations

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from d3qe import ImageError, preprocess


def _pixels(images: np.ndarray) -> np.ndarray:
    """One request's IMAGE [B, 1] (bytes objects) → PIXELS [B, 3, 256, 256]; ImageError names the bad item."""
    items = images.reshape(-1)
    out = []
    for i, item in enumerate(items):
        try:
            out.append(preprocess(bytes(item)).numpy())
        except ImageError as e:
            raise ImageError(f"IMAGE[{i}]: {e}" if len(items) > 1 else f"IMAGE: {e}") from e
    return np.stack(out)


def _error(message: str, code: int):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        # Decoding is single-threaded PIL; the model parts own the cores.
        torch.set_num_threads(1)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            try:
                pixels = _pixels(images)
            except ImageError as e:
                responses.append(_error(str(e), pb_utils.TritonError.INVALID_ARG))
                continue
            except Exception as e:  # a decoder bug on one upload must not fail its neighbours
                message = f"IMAGE could not be preprocessed ({type(e).__name__}: {e})"
                responses.append(_error(message, pb_utils.TritonError.INTERNAL))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("PIXELS", pixels)]))
        return responses
