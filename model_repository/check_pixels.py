"""Triton python-backend model `check_pixels`: the first step of `d3qe_tensor`, PIXELS → CHECKED (the same tensor).

`serving.repository.write_repository` copies this file to `<repository>/check_pixels/1/model.py`.
A request whose PIXELS are not finite values in [0, 1] (the eval transform's range: raw 0–255 bytes
or [-1, 1] normalised pixels are common mistakes) gets its own error response, INVALID_ARG, its message
starting "PIXELS: " (how the gate in front of the ensemble tells a client's mistake).

It is a step of its own because Triton 2.51's ensemble scheduler leaks the whole request (it stays
in flight forever and blocks shutdown) when a step fails while a sibling step is still running:
rejected here, a request never reaches the parallel vq_encoder ∥ clip_visual steps.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils


def problem(pixels: np.ndarray) -> str | None:
    """Why these pixels cannot be scored, or None."""
    if not np.isfinite(pixels).all():
        return "contains NaN or infinity"
    low, high = pixels.min(), pixels.max()
    if low < 0 or high > 1:
        return f"values must lie in [0, 1] (RGB / 255, not normalised), got values in [{low:g}, {high:g}]"
    return None


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])  # the tensors' names: the repository writer's
        (self.input,), (self.output,) = [t["name"] for t in config["input"]], [t["name"] for t in config["output"]]

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            pixels = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
            why = problem(pixels)
            if why:
                error = pb_utils.TritonError(f"{self.input}: {why}", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, pixels)]))
        return responses
