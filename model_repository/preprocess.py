"""Triton python-backend model `preprocess` (IMAGE bytes) and `preprocess_rgb` (RGB pixels) → PIXELS.

`serving.repository.write_repository` copies this file to `<repository>/preprocess/1/model.py` and
`<repository>/preprocess_rgb/1/model.py`; its config's typed parameters
(`serving.model_params.PreprocessParameters`) name the input it reads:

- IMAGE: encoded image files, TYPE_STRING [B, 1]. The bytes are only ever decoded: a request that
  spells a file path is an undecodable image, never a file to open.
- RGB: decoded pixels, TYPE_UINT8 [B, H, W, 3] (the same H, W within a request; any between requests),
  as a trainer holds generated images: no encoding on the way.

PIXELS float32 [B, 3, 256, 256] is upstream's eval transform (`d3qe.preprocess`), the same for an image's
file and for its decoded pixels. Each request is answered on its own: an empty, undecodable, truncated,
too small or oversized image (`d3qe.preprocess` limits: MIN_SIDE, MAX_PIXELS, MAX_IMAGE_BYTES) gets an
error response naming the problem, INVALID_ARG with a message starting with the input's name ("IMAGE: ",
"RGB[i]: ": how the gate in front of the ensemble tells a client's mistake), and the other requests of
the same dynamic batch are answered normally. Triton itself refuses a wrong dtype or shape.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from d3qe_serve.contract import IMAGE
from d3qe_serve.d3qe import ImageError, preprocess
from d3qe_serve.serving.model_params import PreprocessParameters


def _pixels(name: str, images: np.ndarray) -> np.ndarray:
    """One request's images → PIXELS [B, 3, 256, 256]; ImageError names the bad item."""
    items = [bytes(x) for x in images.reshape(-1)] if name == IMAGE else list(images)
    out = []
    for i, item in enumerate(items):
        try:
            out.append(preprocess(item).numpy())
        except ImageError as e:
            raise ImageError(f"{name}[{i}]: {e}" if len(items) > 1 else f"{name}: {e}") from e
    return np.stack(out)


def _error(message: str, code: int):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.input = PreprocessParameters.from_config(config).input
        (self.output,) = [t["name"] for t in config["output"]]  # PIXELS, as the repository writer names it
        # Decoding is single-threaded PIL; the model parts own the cores.
        torch.set_num_threads(1)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
            try:
                pixels = _pixels(self.input, images)
            except ImageError as e:
                responses.append(_error(str(e), pb_utils.TritonError.INVALID_ARG))
                continue
            except Exception as e:  # a decoder bug on one upload must not fail its neighbours
                message = f"{self.input} could not be preprocessed ({type(e).__name__}: {e})"
                responses.append(_error(message, pb_utils.TritonError.INTERNAL))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, pixels)]))
        return responses
